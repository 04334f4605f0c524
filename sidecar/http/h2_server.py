"""The HTTP/2 side of the inbound and outbound listeners: one connection, many streams,
each answered by the same handler as an HTTP/1.1 request (an `H2Request` has the
interface of messages.Request).

A connection becomes HTTP/2 in server.ClientConnection, which hands the transport over
when the client's first bytes are the HTTP/2 preface (prior knowledge, h2c) or its TLS
handshake chose ALPN `h2`. `Upgrade: h2c` is not honoured (RFC 9113 deprecates it).

Rules of this file:
- a stream's request body is acknowledged to the client only as the handler reads it,
  and its answer is written only as the client's windows allow (bounded buffers both
  ways, see h2_core);
- a malformed frame or header block ends the connection (GOAWAY PROTOCOL_ERROR) or the
  stream (RST_STREAM), as RFC 9113 says, logged at debug level, never a traceback;
- floods (rapid resets, pings, settings, priority, empty frames: CVE-2023-44487,
  CVE-2019-9512/9515/9518) end the connection with ENHANCE_YOUR_CALM and one warning;
  CONTINUATION floods and HPACK bombs are bounded by jh2 (64 frames per header block,
  MAX_HEADER_LIST decoded bytes); streams over MAX_CONCURRENT_STREAMS are refused;
- draining sends GOAWAY with the highest stream id, then again with the last stream
  seen, and closes when the streams in progress are answered; at the end of the grace
  period a gRPC stream is ended with grpc-status 14 trailers, another stream reset.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp.http import HttpVersion
from multidict import CIMultiDict, CIMultiDictProxy

from ..errors import SidecarError, error_response
from . import h2_core
from .grpc import Status, encode_message, is_grpc
from .h2_core import FloodGuard, Outgoing, StreamBody
from .headers import HOST_RE
from .messages import Response
from .tls import PeerCertificate

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

HTTP2 = HttpVersion(2, 0)
# Non-request frames a client may send per 10 s window before it counts as a flood.
CONTROL_LIMIT = 2000
# Stream WINDOW_UPDATEs allowed per request the client sends, on top of CONTROL_LIMIT.
UPDATES_PER_STREAM = 4
# Streams a client may reset before their answer, per 10 s window (rapid reset).
RESET_LIMIT = 1000
# The preface and the 9-byte header of the first frame, which must be SETTINGS (type 4).
PREFACE_AND_HEADER = 24 + 9
SETTINGS_FRAME = 4
# After the first GOAWAY of a drain, how long clients get to stop opening streams.
GOAWAY_SETTLE = 0.2
_EMPTY = CIMultiDictProxy(CIMultiDict[str]())


class _Empty:
    """The body of a request that has none."""

    def is_eof(self) -> bool:
        return True

    def at_eof(self) -> bool:
        return True

    async def readany(self) -> bytes:
        return b""

    def read_nowait(self, n: int = -1) -> bytes:
        return b""

    def set_exception(self, exc: BaseException) -> None:
        pass

    def feed_data(self, data: bytes, flow_length: int) -> None:
        pass

    def feed_eof(self) -> None:
        pass

    @property
    def buffered(self) -> int:
        return 0

    @property
    def ended(self) -> bool:
        return True


_NO_BODY = _Empty()


class StreamTransport:
    """What the relay needs of a transport, for one stream: how much waits to be sent,
    and abort (a reset of this stream, not of the connection)."""

    __slots__ = ("_conn", "_stream")

    def __init__(self, conn: H2ServerConnection, stream: _Stream) -> None:
        self._conn = conn
        self._stream = stream

    def get_write_buffer_size(self) -> int:
        transport = self._conn.transport
        return self._stream.out.size + (transport.get_write_buffer_size() if transport is not None else 0)

    def is_closing(self) -> bool:
        return self._stream.closed

    def abort(self) -> None:
        self._conn.reset(self._stream, h2_core.CANCEL)


class _Stream:
    __slots__ = ("body", "closed", "id", "out", "request", "task")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.out = Outgoing()
        self.body: StreamBody | _Empty = _NO_BODY
        self.request: H2Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False  # ended both ways, or reset


class H2Request:
    """One HTTP/2 stream as a request: the interface of messages.Request."""

    __slots__ = (
        "_conn",
        "_stream",
        "close",
        "content",
        "grpc",
        "head_sent",
        "headers",
        "method",
        "peer",
        "raw_path",
        "remote",
        "transport",
    )

    version = HTTP2

    def __init__(
        self,
        conn: H2ServerConnection,
        stream: _Stream,
        pseudo: dict[str, str],
        regular: list[tuple[str, str]],
    ) -> None:
        self._conn = conn
        self._stream = stream
        self.method = pseudo.get(":method", "GET")
        self.raw_path = pseudo.get(":path", "/")
        headers: CIMultiDict[str] = CIMultiDict(regular)
        authority = pseudo.get(":authority")
        if authority and "Host" not in headers:
            headers["Host"] = authority
        # several cookie fields are one header in HTTP/1.1 (RFC 9113 section 8.2.3)
        if len(cookies := headers.getall("cookie", ())) > 1:
            headers.popall("cookie")
            headers["cookie"] = "; ".join(cookies)
        self.headers = CIMultiDictProxy(headers)
        self.grpc = is_grpc(headers.get("content-type"))
        self.content = stream.body
        self.remote = conn.remote
        self.peer = conn.peer
        self.transport = StreamTransport(conn, stream)
        self.close = False
        self.head_sent = False

    def __repr__(self) -> str:
        return f"<H2Request {self.method} {self.raw_path} stream={self._stream.id}>"

    @property
    def scheme(self) -> str:
        return "http" if self.peer is None else "https"

    @property
    def stream_id(self) -> int:
        return self._stream.id

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return tuple((k.encode(), v.encode("utf-8", "surrogateescape")) for k, v in self.headers.items())

    @property
    def body_exists(self) -> bool:
        return self.content is not _NO_BODY

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def path_qs(self) -> str:
        return self.raw_path

    def send_continue(self) -> None:
        """HTTP/2 clients do not wait for 100 Continue (nor need one to send a body)."""

    def client_gone(self) -> bool:
        return self._stream.closed or self._conn.transport is None

    def keeps_alive(self) -> bool:
        return True  # the connection outlives every stream

    def send(self, response: Response) -> None:
        """A whole answer: head and body queued at once, sent as the windows allow."""
        if self.client_gone():
            raise ConnectionResetError("the client reset the stream")
        body = response.body
        end = not body
        self._conn.send_head(self._stream, response.status, response.headers, len(body), end)
        self.head_sent = True
        if body:
            self._conn.queue(self._stream, body, True, None)

    async def start(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        *,
        reason: str | None = None,
        data: bytes = b"",
        end: bool = False,
        raw: bool = False,
        trailers: list[tuple[str, str]] | None = None,
    ) -> None:
        if self.client_gone():
            raise ConnectionResetError("the client reset the stream")
        only_head = end and not data and trailers is None
        if self.method == "HEAD" or status in (204, 304):
            only_head, data, trailers = end, b"", None
        self._conn.send_head(self._stream, status, headers, length, only_head)
        self.head_sent = True
        if not only_head and (data or end):
            await self._conn.write(self._stream, data, end, trailers)

    async def write(self, data: bytes) -> None:
        if data:
            await self._conn.write(self._stream, data, False, None)

    async def end(self, trailers: list[tuple[str, str]] | None = None) -> None:
        if not self._stream.out.end and not self._stream.closed:
            await self._conn.write(self._stream, b"", True, trailers)

    def fail_answer(self, why: str) -> None:
        """The answer cannot be completed (its source broke): a gRPC call ends with
        grpc-status 14 UNAVAILABLE in trailers, anything else with a reset."""
        if self.grpc and self.head_sent:
            self._conn.end_grpc(self._stream, Status.UNAVAILABLE, why)
        else:
            self._conn.reset(self._stream, h2_core.INTERNAL_ERROR)

    def take_over(self) -> Any:
        raise ConnectionResetError("HTTP/2 streams are not upgraded")


class H2ServerConnection(asyncio.Protocol):
    """One HTTP/2 client connection of a listener."""

    def __init__(self, server: Server, remote: str, peer: PeerCertificate | None) -> None:
        self._server = server
        self.remote = remote
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._max_streams = server.limits.h2_max_streams
        self._h2 = h2_core.new_connection(client=False, max_streams=self._max_streams)
        self._streams: dict[int, _Stream] = {}
        self._blocked: set[int] = set()  # streams waiting for a window
        self._control = FloodGuard(CONTROL_LIMIT)
        self._resets = FloodGuard(RESET_LIMIT)
        # stream WINDOW_UPDATEs nothing waited for: clients send a few per stream as they
        # read (grpcio does), so each request earns some (see _request)
        self._updates = FloodGuard(CONTROL_LIMIT)
        self._paused = False
        self._flush_scheduled = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._idle_since: float | None = None
        self._last_stream = 0
        self._goaway_sent = False
        self._refusing_after: int | None = None  # streams above this id are refused
        self._opening: bytearray | None = bytearray()  # until the first frame header is seen
        self.closing = False

    def __repr__(self) -> str:
        return f"<H2ServerConnection {self.remote} streams={len(self._streams)}>"

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)
        self._idle_since = self._loop.time()
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._server.connections.discard(self)
        self.transport = None
        self.closing = True
        for stream in list(self._streams.values()):
            self._lost(stream, ConnectionResetError("the client closed the connection"))
        self._streams.clear()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the client closed the connection"))
        self._drain_waiters.clear()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self._opening is not None and not self._first_frame(data):
            return
        try:
            received = self._h2.receive_data(data)
        except h2_core.ProtocolError as exc:
            self._protocol_error(exc)
            return
        if h2_core.pending_frame_too_large(self._h2):
            # a frame header announcing more than MAX_FRAME: refused now, not once its
            # payload (up to 16 MiB) has been buffered
            self._goaway_and_close(h2_core.ErrorCodes.FRAME_SIZE_ERROR)
            return
        try:
            for event in received:
                self._event(event)
        except h2_core.ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._flush()

    # -- events --------------------------------------------------------------------------

    def _first_frame(self, data: bytes) -> bool:
        """The preface must be followed by a SETTINGS frame (RFC 9113 section 3.4):
        anything else is a connection error, said at once."""
        opening = self._opening
        assert opening is not None
        opening += data[: PREFACE_AND_HEADER - len(opening)]
        if len(opening) < PREFACE_AND_HEADER:
            return True
        self._opening = None
        if opening[len(h2_core.PREFACE) + 3] != SETTINGS_FRAME:
            log.debug("HTTP/2 client %s did not start with SETTINGS", self.remote)
            self._goaway_and_close(h2_core.PROTOCOL_ERROR)
            return False
        return True

    def _event(self, event: Any) -> None:
        ev = h2_core.events
        kind = type(event)
        if kind is ev.RequestReceived:
            self._request(event)
        elif kind is ev.DataReceived:
            stream = self._streams.get(event.stream_id)
            if stream is None:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                if not event.data and not event.stream_ended and self._control.hit(self._loop.time()):
                    self._calm("empty DATA frames")
                stream.body.feed_data(event.data, event.flow_controlled_length)
            if event.stream_ended is not None and stream is not None:
                stream.body.feed_eof()
        elif kind is ev.StreamEnded:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body.feed_eof()
        elif kind is ev.StreamReset:
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                if self._resets.hit(self._loop.time()):
                    self._calm("rapid stream resets")
                self._lost(stream, ConnectionResetError("the client reset the stream"))
        elif kind is ev.WindowUpdated:
            if event.stream_id == 0:
                # not counted: clients such as grpcio send one after every answer, and
                # with no stream blocked it costs nothing
                for stream_id in list(self._blocked):
                    self._flush_stream(stream_id)
            elif event.stream_id in self._blocked:
                self._flush_stream(event.stream_id)
            elif self._updates.hit(self._loop.time()):
                self._calm("window updates")
        elif kind is ev.TrailersReceived:
            stream = self._streams.get(event.stream_id)
            if stream is not None:  # request trailers are not passed on (gRPC sends none)
                stream.body.feed_eof()
        elif kind is ev.ConnectionTerminated:
            self.closing = True
            if not self._streams and self.transport is not None:
                self._flush_now()
                self.transport.close()
        elif kind in (ev.PingReceived, ev.RemoteSettingsChanged, ev.PriorityUpdated, ev.UnknownFrameReceived):
            if self._control.hit(self._loop.time()):
                self._calm(f"{kind.__name__} frames")

    def _request(self, event: Any) -> None:
        stream_id = event.stream_id
        self._last_stream = max(self._last_stream, stream_id)
        refuse = self._refusing_after is not None and stream_id > self._refusing_after
        if refuse or len(self._streams) >= self._max_streams or self.transport is None:
            self._h2.reset_stream(stream_id, h2_core.REFUSED_STREAM)
            return
        stream = _Stream(stream_id)
        self._updates.hit(self._loop.time(), -UPDATES_PER_STREAM)
        pseudo, regular = h2_core.decode_fields(event.headers)
        if event.stream_ended is None:
            stream.body = StreamBody(functools.partial(self._ack, stream_id))
        stream.request = H2Request(self, stream, pseudo, regular)
        self._streams[stream_id] = stream
        self._idle_since = None
        stream.task = self._loop.create_task(self._serve(stream, stream.request))

    async def _serve(self, stream: _Stream, request: H2Request) -> None:
        server = self._server
        try:
            try:
                check_h2_request(request)
                response = await server.handler(request)  # type: ignore[arg-type]
            except SidecarError as err:
                log.debug("refused a request from %s: %s", self.remote, err.message)
                response = error_response(err, server.sidecar_name, None, grpc=request.grpc)
            if not request.head_sent:
                request.send(response)
        except asyncio.CancelledError:
            stream.task = None
            raise
        except ConnectionError as exc:
            log.debug("client %s left before its answer was sent: %s", self.remote, exc)
            self.reset(stream, h2_core.CANCEL)
        except Exception as exc:
            log.error("error handling a request from %s: %r", self.remote, exc)
            if request.head_sent:
                request.fail_answer("the sidecar failed to handle the request")
            else:
                failed = SidecarError(
                    "the sidecar failed to handle the request", status=500, code="internal_error"
                )
                request.send(error_response(failed, server.sidecar_name, None, grpc=request.grpc))
        finally:
            stream.task = None
            if not stream.out.end and not stream.closed and self.transport is not None:
                # answered without an end (an early return): end it now
                self._queue_end(stream)
            self._maybe_done(stream)

    # -- writing ----------------------------------------------------------------------------

    def send_head(
        self, stream: _Stream, status: int, headers: Iterable[tuple[str, str]], length: int | None, end: bool
    ) -> None:
        fields = [(b":status", str(status).encode()), *h2_core.response_fields(headers)]
        if length is not None and not any(name == b"content-length" for name, _ in fields):
            if status not in (204, 304) and status >= 200:
                fields.append((b"content-length", str(length).encode()))
        try:
            self._h2.send_headers(stream.id, fields, end_stream=end)
        except (h2_core.ProtocolError, KeyError) as exc:
            raise ConnectionResetError(f"the stream closed: {exc}") from None
        if end:
            stream.out.end = True
            self._maybe_done(stream)
        self._flush()

    def queue(self, stream: _Stream, data: bytes, end: bool, trailers: list[tuple[str, str]] | None) -> None:
        out = stream.out
        if data:
            out.data.append(data)
            out.size += len(data)
        if end:
            out.end = True
            if trailers:
                out.trailers = h2_core.response_fields(trailers)
        self._flush_stream(stream.id)

    async def write(
        self, stream: _Stream, data: bytes, end: bool, trailers: list[tuple[str, str]] | None
    ) -> None:
        if stream.closed or self.transport is None:
            raise ConnectionResetError("the client reset the stream")
        self.queue(stream, data, end, trailers)
        out = stream.out
        while out.size >= h2_core.OUT_HIGH and not stream.closed:
            out.waiter = self._loop.create_future()
            try:
                await out.waiter
            finally:
                out.waiter = None
        if stream.closed and (out.size or not end):
            raise ConnectionResetError("the client reset the stream")
        if self._paused:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _queue_end(self, stream: _Stream) -> None:
        try:
            self.queue(stream, b"", True, None)
        except ConnectionError:
            pass

    def end_grpc(self, stream: _Stream, status: int, why: str) -> None:
        """End a started gRPC answer with a status of the sidecar's (its data so far
        stays, unsent data is dropped)."""
        if stream.closed or stream.out.end:
            return
        stream.out.data.clear()
        stream.out.size = 0
        message = encode_message(f"{self._server.sidecar_name} sidecar: {why}")
        self.queue(stream, b"", True, [("grpc-status", str(int(status))), ("grpc-message", message)])

    def reset(self, stream: _Stream, code: int) -> None:
        if stream.closed:
            return
        stream.closed = True
        self._streams.pop(stream.id, None)
        self._blocked.discard(stream.id)
        try:
            self._h2.reset_stream(stream.id, code)
        except (h2_core.ProtocolError, KeyError):
            pass
        stream.out.wake()
        stream.body.set_exception(ConnectionResetError("the stream was reset"))
        self._flush()
        self._after_stream()

    def _ack(self, stream_id: int, length: int) -> None:
        if self.transport is None or not length:
            return
        try:
            self._h2.acknowledge_received_data(length, stream_id)
        except (h2_core.ProtocolError, KeyError):  # the stream is gone: the connection window still counts
            self._h2.increment_flow_control_window(length)
        self._flush()

    def _flush_stream(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.closed:
            self._blocked.discard(stream_id)
            return
        try:
            ended = h2_core.flush_stream(self._h2, stream_id, stream.out)
        except (h2_core.ProtocolError, KeyError):  # reset by the client meanwhile
            self._blocked.discard(stream_id)
            return
        if stream.out.data:
            self._blocked.add(stream_id)
        else:
            self._blocked.discard(stream_id)
        if ended:
            self._maybe_done(stream)
        self._flush()

    def _flush(self) -> None:
        """Send what the engine has, once per event-loop iteration: the frames of every
        stream answered in one iteration go out in one write (one system call)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    # -- ends of streams and connections -----------------------------------------------------

    def _maybe_done(self, stream: _Stream) -> None:
        """A stream whose answer is sent and whose handler finished is forgotten."""
        if stream.out.end and not stream.out.data and stream.task is None and not stream.closed:
            stream.closed = True
            self._streams.pop(stream.id, None)
            self._blocked.discard(stream.id)
            if not stream.body.ended:
                # answered before the body ended: stop the client sending it
                try:
                    self._h2.reset_stream(stream.id, h2_core.NO_ERROR)
                except (h2_core.ProtocolError, KeyError):
                    pass
                stream.body.set_exception(ConnectionResetError("answered before the body ended"))
                self._flush()
            self._after_stream()

    def _after_stream(self) -> None:
        if not self._streams:
            self._idle_since = self._loop.time()
            if self.closing and self.transport is not None:
                self._flush_now()
                self.transport.close()

    def _lost(self, stream: _Stream, exc: BaseException) -> None:
        stream.closed = True
        stream.out.wake()
        stream.body.set_exception(exc)
        task = stream.task
        if task is not None:
            task.cancel()  # nobody reads the answer: stop the work it started

    def _protocol_error(self, exc: BaseException) -> None:
        log.debug("HTTP/2 protocol error from %s: %s", self.remote, exc)
        if h2_core.goaway_queued(self._h2):  # jh2 said it already, with its own code
            self._goaway_and_close(None)
            return
        self._goaway_and_close(int(getattr(exc, "error_code", h2_core.PROTOCOL_ERROR)))

    def _calm(self, what: str) -> None:
        log.warning("closing the HTTP/2 connection of %s: too many %s (a flood)", self.remote, what)
        self._server.refused += 1
        self._goaway_and_close(h2_core.ENHANCE_YOUR_CALM)
        raise h2_core.exceptions.ProtocolError("flood")  # stops the event loop of data_received

    def _goaway_and_close(self, code: int | None) -> None:
        """GOAWAY with `code` (None: the one jh2 queued) and close."""
        transport = self.transport
        if transport is None:
            return
        self.closing = True
        tail = b"" if code is None else h2_core.goaway_frame(self._last_stream, code)
        transport.write(self._h2.data_to_send() + tail)
        for stream in list(self._streams.values()):
            self._lost(stream, ConnectionResetError("the connection closed"))
        self._streams.clear()
        transport.close()
        self.transport = None

    # -- the listener's view ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._streams)

    def idle_expired(self, now: float, timeout: float) -> bool:
        since = self._idle_since
        if since is None or self._streams or now - since < timeout:
            return False
        if self.transport is not None:
            self._goaway_and_close(h2_core.NO_ERROR)
        return True

    def shutdown(self) -> None:
        """Drain: a GOAWAY that lets everything through, then (after a moment for
        requests in flight) one with the last stream seen; close once answered."""
        if self._goaway_sent or self.transport is None:
            return
        self._goaway_sent = True
        self.closing = True
        self.transport.write(h2_core.goaway_frame(2**31 - 1))
        self._loop.call_later(GOAWAY_SETTLE, self._final_goaway)

    def _final_goaway(self) -> None:
        if self.transport is None:
            return
        self._refusing_after = self._last_stream
        self._flush_now()
        self.transport.write(h2_core.goaway_frame(self._last_stream))
        if not self._streams:
            self.transport.close()

    def force_close(self) -> None:
        """The grace period is over: end what is left, gRPC calls with status 14."""
        for stream in list(self._streams.values()):
            request = stream.request
            if request is not None and request.grpc:
                if request.head_sent:
                    self.end_grpc(stream, Status.UNAVAILABLE, "shutting down")
                else:
                    message = encode_message(f"{self._server.sidecar_name} sidecar: shutting down")
                    self.send_grpc_only(stream, Status.UNAVAILABLE, message)
            else:
                self.reset(stream, h2_core.CANCEL)
            if stream.task is not None:
                stream.task.cancel()
        self._flush_now()
        if self.transport is not None:
            self.transport.close()

    def send_grpc_only(self, stream: _Stream, status: int, message: str) -> None:
        try:
            self._h2.send_headers(
                stream.id,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", str(int(status)).encode()),
                    (b"grpc-message", message.encode()),
                ],
                end_stream=True,
            )
        except (h2_core.ProtocolError, KeyError):
            pass
        stream.out.end = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# RFC 9113 section 8.2.1 and RFC 9110 section 5: field names are lower-case tokens, and
# values hold no NUL, CR or LF (nor, as on the HTTP/1.1 listener, other controls but
# HTAB). A name or value outside these would reach an HTTP/1.1 app as something else.
_NAMES = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+(?:\n[!#$%&'*+\-.^_`|~0-9a-z]+)*")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_PATH = re.compile(r"[\x00-\x20\x7f#]")


def check_h2_request(request: H2Request) -> None:
    """What jh2 lets through but a proxy must not pass on: a malformed request (RFC 9113
    section 8.1.1) is answered 400 and never forwarded. Raises SidecarError."""
    from ..errors import BadRequest, MethodNotAllowed

    method = request.method
    if not _METHOD.fullmatch(method):
        raise BadRequest("the :method is not a token")
    if method == "CONNECT":
        raise MethodNotAllowed("CONNECT is not supported: the sidecar is not a tunnel")
    path = request.raw_path
    if not path.startswith("/") and not (path == "*" and method == "OPTIONS"):
        raise BadRequest("the :path must be an origin-form path")
    if _BAD_PATH.search(path):
        raise BadRequest("the :path holds a space, a control character or a fragment")
    headers = request.headers
    # All names in one match: joined by a newline, which no token holds, so a name with a
    # newline in it shows as one newline too many. (jh2 refused upper-case names already;
    # "Host" is ours, from :authority.)
    names = "\n".join(headers.keys()).lower()
    if not _NAMES.fullmatch(names) or names.count("\n") != len(headers) - 1:
        raise BadRequest("a header name is not a token")
    if _BAD_VALUE.search("\t".join(headers.values())):
        raise BadRequest("a header value holds a control character")
    host = headers.get("Host")
    if host is None:
        raise BadRequest("an HTTP/2 request needs :authority or Host")
    if not HOST_RE.match(host):
        raise BadRequest("the :authority is malformed")
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or (not request.body_exists and length != "0")):
        raise BadRequest("the content-length disagrees with the request's body")
