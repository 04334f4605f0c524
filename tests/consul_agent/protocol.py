"""Consul's HTTP conventions, shared by every module of the agent.

What the agent says it is (version, datacenter, server address), the check statuses, errors as
Consul answers them (a status and a plain-text body), Go durations, request bodies decoded the way
Go decodes JSON, Go's spellings of a boolean, and the JSON, text and empty responses.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

VERSION = "1.22.0"
DATACENTER = "dc1"
SERVER_ADDR = "127.0.0.1:8300"
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)


class ConsulError(Exception):
    """An error answered to the client: an HTTP status and Consul's plain-text body."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


# ---------------------------------------------------------------------------------------------
# Go durations


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)?")


def parse_duration(value: Any) -> float:
    """Seconds from a Go duration string ("1m30s", "500ms") or a number of nanoseconds."""
    if isinstance(value, bool):
        raise ValueError(f"time: invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    if not isinstance(value, str):
        raise ValueError(f"time: invalid duration {value!r}")
    text = value
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{value}"')
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(f'time: invalid duration "{value}"')
        if match.group(2) is None:
            if match.end() == len(text):
                raise ValueError(f'time: missing unit in duration "{value}"')
            unit_end = match.end()
            while unit_end < len(text) and not (text[unit_end].isdigit() or text[unit_end] == "."):
                unit_end += 1
            raise ValueError(f'time: unknown unit "{text[match.end() : unit_end]}" in duration "{value}"')
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def _fraction(value: int, unit: int) -> str:
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def format_duration(seconds: float) -> str:
    """Go's ``time.Duration.String()``: "10s", "1m30s", "100ms", "1h0m0s"."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < 1_000:
        return f"{sign}{nanos}ns"
    if nanos < 1_000_000:
        return f"{sign}{_fraction(nanos, 1_000)}\u00b5s"
    if nanos < 1_000_000_000:
        return f"{sign}{_fraction(nanos, 1_000_000)}ms"
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return f"{sign}{text}{_fraction(rest, 1_000_000_000)}s"


# ---------------------------------------------------------------------------------------------
# Request bodies: Go decodes JSON keys case-insensitively and Consul also accepts snake_case.


def _canon(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


class Fields:
    """A JSON object looked up by canonical key, with Go-like type checks."""

    def __init__(self, raw: Any, what: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _decode_error(what, "map[string]interface {}", raw)
        self.what = what
        self.raw = raw
        self.values = {_canon(k): v for k, v in raw.items()}

    def has(self, *names: str) -> bool:
        return any(self.values.get(_canon(n)) is not None for n in names)

    def get(self, *names: str) -> Any:
        for name in names:
            value = self.values.get(_canon(name))
            if value is not None:
                return value
        return None

    def text(self, *names: str, default: str = "") -> str:
        value = self.get(*names)
        if value is None:
            return default
        if not isinstance(value, str):
            raise _decode_error(f"{self.what}.{names[0]}", "string", value)
        return value

    def integer(self, *names: str, default: int = 0) -> int:
        value = self.get(*names)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise _decode_error(f"{self.what}.{names[0]}", "int", value)
        return int(value)

    def flag(self, *names: str, default: bool = False) -> bool:
        value = self.get(*names)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _decode_error(f"{self.what}.{names[0]}", "bool", value)
        return value

    def str_list(self, *names: str) -> list[str]:
        value = self.get(*names)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _decode_error(f"{self.what}.{names[0]}", "[]string", value)
        return list(value)

    def str_map(self, *names: str) -> dict[str, str]:
        value = self.get(*names)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _decode_error(f"{self.what}.{names[0]}", "map[string]string", value)
        return dict(value)

    def duration(self, *names: str) -> float:
        value = self.get(*names)
        if value is None or value == "":
            return 0.0
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConsulError(400, f"Request decode failed: {exc}") from None


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "<nil>"


def _decode_error(field_name: str, want: str, got: Any) -> ConsulError:
    return ConsulError(
        400,
        f"Request decode failed: 1 error(s) decoding:\n\n* '{field_name}' expected type '{want}', "
        f"got unconvertible type '{_go_type(got)}'",
    )


def _parse_go_bool(text: str) -> bool | None:
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", charset="utf-8")


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )


def _empty() -> web.Response:
    return web.Response(status=200)
