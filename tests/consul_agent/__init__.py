"""The Consul test agent, as a package (see core.py)."""

from .core import (
    VERSION,
    BackgroundAgent,
    ConsulTestAgent,
    Filter,
    FilterError,
    format_duration,
    parse_duration,
)

__all__ = [
    "VERSION",
    "BackgroundAgent",
    "ConsulTestAgent",
    "Filter",
    "FilterError",
    "format_duration",
    "parse_duration",
]
