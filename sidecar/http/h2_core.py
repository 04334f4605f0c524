"""What the HTTP/2 server and client of the wing share: the protocol engine (jh2, a
drop-in fork of hyper-h2 whose compiled header codec measured about 30% less CPU per
exchange than h2 here, see bench/h2lib.py), the settings both sides advertise, the
flow-controlled body of one stream, and the header rules of RFC 9113 section 8.2.

Rules of this file:
- received DATA is acknowledged (the peer's window reopened) only once the reader took
  it, so a slow reader slows the sender instead of growing our memory: at most one
  stream window (STREAM_WINDOW) is buffered per stream;
- a GOAWAY received does not end the streams it lets finish: jh2 would close the whole
  connection state on it, so MeshConnection keeps the state open and only reports it;
- connection-specific headers (RFC 9113 section 8.2.2) never go into an HTTP/2 frame.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Callable, Iterable
from typing import Any

import jh2.config
import jh2.connection
import jh2.events
import jh2.exceptions
import jh2.settings
from jh2.errors import ErrorCodes

from .headers import HOP_BY_HOP

events = jh2.events
exceptions = jh2.exceptions
ProtocolError = jh2.exceptions.ProtocolError
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Flow-control windows: larger than the 65,535 default so that one stream can fill a
# fast link, bounded so that a slow reader costs at most this much memory per stream.
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 16384
MAX_HEADER_LIST = 64 * 1024
# Outgoing bytes buffered per stream before a writer waits for the peer's window.
OUT_HIGH = 256 * 1024

CANCEL = ErrorCodes.CANCEL
REFUSED_STREAM = ErrorCodes.REFUSED_STREAM
INTERNAL_ERROR = ErrorCodes.INTERNAL_ERROR
ENHANCE_YOUR_CALM = ErrorCodes.ENHANCE_YOUR_CALM
NO_ERROR = ErrorCodes.NO_ERROR
PROTOCOL_ERROR = ErrorCodes.PROTOCOL_ERROR

# Lower-cased names that must not appear in HTTP/2 (RFC 9113 section 8.2.2), and
# `host`, which becomes `:authority`.
_NOT_IN_H2 = HOP_BY_HOP | {"host"}


class MeshConnection(jh2.connection.H2Connection):
    """jh2's connection, except that a GOAWAY received leaves the streams below its last
    stream id running (jh2 moves the whole connection to CLOSED, which would make every
    later frame of those streams a protocol error)."""

    goaway_last_stream: int | None = None
    # False on the server side: a stream over MAX_CONCURRENT_STREAMS is refused by the
    # server (RST_STREAM REFUSED_STREAM, which a client may retry), where jh2 would end
    # the whole connection for it
    enforce_stream_limit = True

    @property
    def open_inbound_streams(self) -> int:
        count: int = jh2.connection.H2Connection.open_inbound_streams.fget(self)
        return count if self.enforce_stream_limit else 0

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = jh2.events.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        self.goaway_last_stream = frame.last_stream_id
        return [], [event]


def new_connection(client: bool, max_streams: int = 1000) -> MeshConnection:
    conn = MeshConnection(
        jh2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=False,  # we build them ourselves (see to_h2)
            normalize_outbound_headers=False,
        )
    )
    settings = {
        jh2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        jh2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        jh2.settings.SettingCodes.ENABLE_PUSH: 0,
    }
    if not client:
        settings[jh2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = max_streams
        conn.enforce_stream_limit = False
    conn.local_settings = jh2.settings.Settings(client=client, initial_values=settings)
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    conn.max_inbound_frame_size = MAX_FRAME
    return conn


def pending_frame_too_large(conn: MeshConnection) -> bool:
    """Whether the bytes jh2 holds back, waiting for the rest of a frame, are already more
    than a frame may be: its header announced an oversized frame."""
    buffer = conn.incoming_buffer
    return len(buffer._data) - buffer._data_offset > MAX_FRAME + 9


def goaway_queued(conn: MeshConnection) -> bool:
    """Whether jh2 ended the connection itself (it queued its GOAWAY)."""
    return bool(conn.state_machine.state == jh2.connection.ConnectionState.CLOSED)


def goaway_frame(last_stream_id: int, error_code: int = 0) -> bytes:
    """A GOAWAY frame written beside the engine, which stays open for the streams that
    may still finish (see MeshConnection for the receiving side)."""
    return (
        struct.pack(">I", 8)[1:]
        + bytes((7, 0))
        + struct.pack(">III", 0, last_stream_id & 0x7FFFFFFF, error_code)
    )


def to_h2(
    method: str, scheme: str, authority: str, path: str, headers: Iterable[tuple[str, str]], te_trailers: bool
) -> list[tuple[bytes, bytes]]:
    """Request headers as HTTP/2 fields: the pseudo-headers first, names lower-cased,
    connection-specific ones dropped (`te: trailers`, the one TE allowed, when asked)."""
    out = [
        (b":method", method.encode()),
        (b":scheme", scheme.encode()),
        (b":authority", authority.encode("utf-8", "surrogateescape")),
        (b":path", path.encode("utf-8", "surrogateescape")),
    ]
    out += response_fields(headers)
    if te_trailers:
        out.append((b"te", b"trailers"))
    return out


# Header names as HTTP/2 writes them (lower-cased bytes; None: never sent), by name.
_FIELD_NAMES: dict[str, bytes | None] = {}


def _field_name(name: str) -> bytes | None:
    lowered = name.lower()
    field = None if lowered in _NOT_IN_H2 else lowered.encode("ascii", "replace")
    if len(_FIELD_NAMES) < 4096:
        _FIELD_NAMES[name] = field
    return field


def response_fields(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header fields for HTTP/2: lower-case names, no connection-specific ones."""
    names = _FIELD_NAMES
    out = []
    for name, value in headers:
        field = names[name] if name in names else _field_name(name)
        if field is not None:
            out.append((field, value.encode("utf-8", "surrogateescape")))
    return out


def decode_fields(fields: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(pseudo-headers, regular headers) of a received header block, as text."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in fields:
        text = value.decode("utf-8", "surrogateescape")
        if name[:1] == b":":
            pseudo[name.decode("ascii", "replace")] = text
        else:
            regular.append((name.decode("ascii", "replace"), text))
    return pseudo, regular


class StreamBody:
    """The DATA of one stream as the byte stream a handler reads (readany, like aiohttp's
    StreamReader), acknowledged to the peer as it is taken."""

    __slots__ = ("_ack", "_chunks", "_eof", "_exc", "_size", "_waiter")

    def __init__(self, ack: Callable[[int], None]) -> None:
        self._ack = ack
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<StreamBody buffered={self._size} eof={self._eof}>"

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def ended(self) -> bool:
        """The peer ended its side (read or not: what it sent is all here)."""
        return self._eof

    def feed_data(self, data: bytes, flow_length: int) -> None:
        if self._eof or self._exc is not None:
            self._ack(flow_length)  # nobody will read it: keep the connection window open
            return
        self._chunks.append((data, flow_length))
        self._size += len(data)
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self._eof:
            # the body arrived whole: a reset after it (a server that answered before
            # reading all of the request, then RST_STREAM NO_ERROR) does not unsay it
            return
        self._exc = exc
        self._release()
        self._wake()

    def exception(self) -> BaseException | None:
        return self._exc

    def is_eof(self) -> bool:
        return self._eof and not self._chunks

    def at_eof(self) -> bool:
        return self.is_eof()

    def read_nowait(self, n: int = -1) -> bytes:
        """Everything buffered (the relay's fast path, once is_eof() said it is whole)."""
        if not self._chunks:
            return b""
        data = b"".join(chunk for chunk, _ in self._chunks)
        self._release()
        return data

    async def readany(self) -> bytes:
        """The next bytes received, b"" at the end. Raises what set_exception was given."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data, flow = self._chunks.popleft()
        self._size -= len(data)
        self._ack(flow)
        return data

    def _release(self) -> None:
        flow = sum(length for _, length in self._chunks)
        self._chunks.clear()
        self._size = 0
        if flow:
            self._ack(flow)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Outgoing:
    """What one stream still has to send: body bytes waiting for the peer's window, and
    how the stream ends (a flag, or trailers). Flushed by the connection."""

    __slots__ = ("data", "end", "size", "trailers", "waiter")

    def __init__(self) -> None:
        self.data: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.end = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def flush_stream(conn: MeshConnection, stream_id: int, out: Outgoing) -> bool:
    """Hand jh2 as much of `out` as the peer's windows allow; True when the stream ended.
    Raises jh2's errors for a stream that closed meanwhile."""
    data = out.data
    while data:
        window = conn.local_flow_control_window(stream_id)
        if window <= 0:
            return False
        chunk = data[0]
        size = min(window, conn.max_outbound_frame_size)
        if len(chunk) > size:
            data[0] = chunk[size:]
            chunk = chunk[:size]
        else:
            data.popleft()
        out.size -= len(chunk)
        conn.send_data(stream_id, chunk)
    if out.size < OUT_HIGH:
        out.wake()
    if not out.end:
        return False
    if out.trailers is not None:
        conn.send_headers(stream_id, out.trailers, end_stream=True)
    else:
        conn.end_stream(stream_id)
    out.wake()
    return True


class FloodGuard:
    """Counts what a peer makes us do that is not a request (pings, settings, resets of
    streams it just opened, priority frames, empty frames) in 10-second windows; over
    `limit` in one window, the connection is closed with ENHANCE_YOUR_CALM."""

    __slots__ = ("_count", "_limit", "_window_start")

    WINDOW = 10.0

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._count = 0
        self._window_start = 0.0

    def hit(self, now: float, weight: int = 1) -> bool:
        """Count one; True when the peer is over the limit."""
        if now - self._window_start > self.WINDOW:
            self._window_start = now
            self._count = 0
        self._count += weight
        return self._count > self._limit
