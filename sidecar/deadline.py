"""One deadline per request, shared by every hop of a call chain.

Rules of this file:
- the budget of a request is the smallest of: the configured overall timeout, the
  caller's `X-Request-Timeout-Ms` and the previous hop's `X-Sidecar-Deadline-Ms`
  (both in milliseconds of remaining time); a header can only shorten the budget;
- a malformed header value is ignored (never an error): the configured timeout holds;
- each hop sends on what is left, in both headers: the sidecar header for the next
  sidecar, `X-Request-Timeout-Ms` for an app that wants to pass its deadline along;
- time comes in as `now` (monotonic seconds): no function here reads a clock;
- a gRPC call's budget is its `grpc-timeout` (and the previous hop's header): without
  one it has no deadline at all (`--request-timeout` does not cut gRPC streams), and it
  passes `grpc-timeout` on, shrunk, to the next hop and the app.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .http.grpc import format_timeout, parse_timeout

DEADLINE_HEADER = "X-Sidecar-Deadline-Ms"
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
GRPC_TIMEOUT_HEADER = "grpc-timeout"
_MAX_DIGITS = 10  # about 115 days in ms; longer values are noise

Source = Literal["config", "caller", "upstream"]
_SOURCES: tuple[tuple[str, Source], ...] = ((TIMEOUT_HEADER, "caller"), (DEADLINE_HEADER, "upstream"))


def parse_ms(value: str | None) -> float | None:
    """Seconds from a non-negative integer count of milliseconds; None when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_DIGITS or not value.isascii() or not value.isdigit():
        return None
    return int(value) / 1000.0


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must be answered by, on the monotonic clock, and where the limit came from."""

    expires_at: float
    budget: float  # seconds granted when the request arrived (math.inf: no deadline)
    source: Source
    grpc: bool = False  # a gRPC call: grpc-timeout goes on to the next hop too

    @property
    def unbounded(self) -> bool:
        return math.isinf(self.expires_at)

    def remaining(self, now: float) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.expires_at - now)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def try_timeout(self, per_try: float | None, now: float) -> float | None:
        """Timeout for one attempt: the per-try timeout, cut to what the deadline leaves
        (None: neither bounds it)."""
        left = self.remaining(now)
        timeout = left if per_try is None else min(per_try, left)
        return None if math.isinf(timeout) else timeout

    def timeout(self, now: float) -> float | None:
        """What the deadline leaves, or None for a call without one."""
        return None if self.unbounded else self.remaining(now)

    def header_value(self, now: float) -> str:
        """The remaining budget in whole milliseconds, for the next hop."""
        return str(int(self.remaining(now) * 1000))

    def outgoing_headers(self, now: float) -> dict[str, str]:
        """Headers that carry the remaining budget to the next hop (set, not appended)."""
        if self.unbounded:
            return {}
        value = self.header_value(now)
        headers = {DEADLINE_HEADER: value, TIMEOUT_HEADER: value}
        if self.grpc:
            headers[GRPC_TIMEOUT_HEADER] = format_timeout(self.remaining(now))
        return headers

    def app_headers(self, now: float) -> list[tuple[str, str]]:
        """What the app learns of its remaining budget."""
        if self.unbounded:
            return []
        headers = [(TIMEOUT_HEADER, self.header_value(now))]
        if self.grpc:
            headers.append((GRPC_TIMEOUT_HEADER, format_timeout(self.remaining(now))))
        return headers


def from_headers(headers: Mapping[str, str], configured: float, now: float, grpc: bool = False) -> Deadline:
    """The deadline of a request that arrived at `now` with `headers`.

    `configured` is the overall request timeout in seconds (not for `grpc` calls). Read
    the headers from the request as received, before any stripping of internal headers.
    """
    source: Source = "config"
    if grpc:
        budget = math.inf
        asked = parse_timeout(headers.get(GRPC_TIMEOUT_HEADER))
        if asked is not None:
            budget, source = asked, "caller"
        upstream = parse_ms(headers.get(DEADLINE_HEADER))
        if upstream is not None and upstream < budget:
            budget, source = upstream, "upstream"
        return Deadline(expires_at=now + budget, budget=budget, source=source, grpc=True)
    budget = configured
    if TIMEOUT_HEADER not in headers and DEADLINE_HEADER not in headers:
        return Deadline(expires_at=now + budget, budget=budget, source=source)
    for header, kind in _SOURCES:
        asked = parse_ms(headers.get(header))
        if asked is not None and asked < budget:
            budget, source = asked, kind
    return Deadline(expires_at=now + budget, budget=budget, source=source)
