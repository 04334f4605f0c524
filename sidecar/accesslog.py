"""One line per request, as JSON or for humans, or nothing.

Rules of this file: the path is logged without its query string (queries carry tokens
and personal data) and without the scheme and authority of an absolute-form target;
no header value is ever logged except the request id, and every logged string is
length-capped, and in the text format escaped, so that a request cannot forge lines.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from .config import ACCESS_LOG_FORMATS, AccessLogFormat

_MAX_PATH = 2048
_MAX_FIELD = 128


def loggable_path(target: str) -> str:
    """The path of a request target, without query, fragment, scheme or authority."""
    if target.startswith(("http://", "https://")):
        start = target.find("/", target.index("://") + 3)
        target = "/" if start == -1 else target[start:]
    cut = len(target)
    for mark in ("?", "#"):
        at = target.find(mark)
        if at != -1:
            cut = min(cut, at)
    return target[:cut][:_MAX_PATH] or "/"


def _text_safe(value: str) -> str:
    """Escapes spaces, quotes, backslashes and control characters for the text format."""
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and not ch.isspace() and ch != '"':
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


def _iso(ts: float) -> str:
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cap(value: str | None, limit: int = _MAX_FIELD) -> str | None:
    return None if value is None else value[:limit]


class AccessLog:
    """Writes one line per request to `stream` (stdout by default) in format `fmt`.

    `clock` gives the Unix time stamped on each line. Write errors (a closed pipe) are
    counted in `dropped`, never raised into the request.
    """

    def __init__(
        self,
        fmt: AccessLogFormat = "json",
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.time,
        flush: bool = True,
    ) -> None:
        if fmt not in ACCESS_LOG_FORMATS:
            raise ValueError(
                f"unknown access log format {fmt!r}; choose one of {', '.join(ACCESS_LOG_FORMATS)}"
            )
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.flush = flush
        self.lines = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<AccessLog {self.fmt} lines={self.lines} dropped={self.dropped}>"

    @property
    def enabled(self) -> bool:
        return self.fmt != "off"

    def log(
        self,
        *,
        direction: str,
        method: str,
        target: str,
        status: int,
        duration: float,
        service: str | None = None,
        instance: str | None = None,
        attempts: int = 1,
        request_id: str | None = None,
        trace_id: str | None = None,
        caller: str | None = None,
        protocol: str = "HTTP/1.1",
        grpc_status: str | None = None,
    ) -> None:
        """Log one finished request. `target` is the raw request target (its query is dropped);
        `duration` is in seconds; `instance` is the endpoint's id (or address) that answered;
        `caller` the verified service name of an inbound mutual TLS caller."""
        if self.fmt == "off":
            return
        record = {
            "time": _iso(self.clock()),
            "direction": direction,
            "method": _cap(method, 32),
            "path": loggable_path(target),
            "status": status,
            "duration_ms": round(duration * 1000.0, 3),
            "service": _cap(service),
            "instance": _cap(instance),
            "attempts": attempts,
            "request_id": _cap(request_id),
            "trace_id": _cap(trace_id, 32),
            "caller": _cap(caller),
            "protocol": protocol,
            "grpc_status": _cap(grpc_status, 8),
        }
        line = json.dumps(record, separators=(",", ":")) if self.fmt == "json" else self._text(record)
        try:
            self.stream.write(line + "\n")
            if self.flush:
                self.stream.flush()
        except (OSError, ValueError):  # closed pipe or closed file: never fail the request
            self.dropped += 1
            return
        self.lines += 1

    @staticmethod
    def _text(r: Mapping[str, object]) -> str:
        def s(key: str) -> str:
            value = r[key]
            return "-" if value is None else _text_safe(str(value))

        return (
            f"{r['time']} {s('direction')} {s('method')} {s('path')} {r['status']} {r['duration_ms']}ms "
            f"service={s('service')} instance={s('instance')} attempts={r['attempts']} "
            f"request_id={s('request_id')} trace_id={s('trace_id')} caller={s('caller')} "
            f"protocol={s('protocol')} grpc_status={s('grpc_status')}"
        )
