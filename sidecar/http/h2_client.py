"""The HTTP/2 client of the forwarder: multiplexed connections to one endpoint (an h2c
app, or a peer sidecar over mutual TLS with ALPN `h2`), one stream per request.

Rules of this file:
- a stream that provably never started raises NotSent (the connection refused it with
  REFUSED_STREAM, or a GOAWAY excluded it, or the connection was gone before it was
  opened): the caller may send it elsewhere whatever its method;
- a connection takes new streams while it has fewer than the peer's
  MAX_CONCURRENT_STREAMS and no GOAWAY; beyond that the pool opens another connection,
  up to `max_connections`, then waits (PoolTimeout) like the HTTP/1.1 pool;
- the request body is sent as the peer's windows allow, chunk by chunk as it arrives
  (a bidirectional stream flows message by message); the response body is acknowledged
  only as the relay takes it (see h2_core.StreamBody);
- an abandoned stream (timeout, caller gone) is reset with CANCEL; the connection and
  its other streams go on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from . import h2_core
from .client import ConnectTimeout, HeadTimeout, NotSent, PoolTimeout, split_endpoint
from .h2_core import Outgoing, StreamBody
from .tls import ClientTLS, peer_certificate

log = logging.getLogger(__name__)

# Streams we open on one connection at most, whatever the peer allows.
MAX_STREAMS = 1000


class StreamReset(ConnectionResetError):
    """The peer reset the stream (after it may have started the request)."""


class NoHttp2(ConnectionError):
    """The peer did not agree to HTTP/2 (ALPN)."""


class _Stream:
    __slots__ = ("body", "head", "id", "out", "trailers", "writer")

    def __init__(self, stream_id: int, loop: asyncio.AbstractEventLoop, conn: H2ClientConnection) -> None:
        self.id = stream_id
        self.head: asyncio.Future[tuple[dict[str, str], list[tuple[str, str]], bool]] = loop.create_future()
        self.body = StreamBody(lambda n: conn.ack(stream_id, n))
        self.out = Outgoing()
        self.trailers: list[tuple[str, str]] | None = None
        self.writer: asyncio.Task[None] | None = None


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection to the pool's endpoint."""

    def __init__(self, pool: H2Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._h2 = h2_core.new_connection(client=True)
        self.streams: dict[int, _Stream] = {}
        self._blocked: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.goaway: int | None = None  # last stream id the peer will process
        self.tls_generation = 0
        self._paused = False
        self._flush_scheduled = False
        self._drain: list[asyncio.Future[None]] = []
        self.idle_since: float | None = None
        # the peer's first SETTINGS (its stream limit among them): streams wait for it
        self.settings: asyncio.Future[None] = self._loop.create_future()

    def __repr__(self) -> str:
        return f"<H2ClientConnection {self._pool.endpoint} streams={len(self.streams)}>"

    @property
    def capacity(self) -> int:
        if self.transport is None or self.goaway is not None or self.transport.is_closing():
            return 0
        limit = min(self._h2.remote_settings.max_concurrent_streams, MAX_STREAMS)
        return limit - len(self.streams)

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        if not self.settings.done():
            self.settings.set_exception(ConnectionResetError(f"{self._pool.endpoint} closed the connection"))
            self.settings.exception()
        for stream in list(self.streams.values()):
            self._fail(stream, ConnectionResetError(f"{self._pool.endpoint} closed the connection"))
        self.streams.clear()
        for waiter in self._drain:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the connection closed"))
        self._drain.clear()
        self._pool.lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain:
            if not waiter.done():
                waiter.set_result(None)
        self._drain.clear()

    def data_received(self, data: bytes) -> None:
        try:
            for event in self._h2.receive_data(data):
                self._event(event)
        except h2_core.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from %s: %s", self._pool.endpoint, exc)
            self.abort()
            return
        self._flush()

    def _event(self, event: Any) -> None:
        ev = h2_core.events
        kind = type(event)
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if kind is ev.ResponseReceived:
            if stream is not None and not stream.head.done():
                pseudo, regular = h2_core.decode_fields(event.headers)
                stream.head.set_result((pseudo, regular, event.stream_ended is not None))
        elif kind is ev.DataReceived:
            if stream is None:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                stream.body.feed_data(event.data, event.flow_controlled_length)
        elif kind is ev.TrailersReceived:
            if stream is not None:
                stream.trailers = h2_core.decode_fields(event.headers)[1]
        elif kind is ev.StreamEnded:
            if stream is not None:
                stream.body.feed_eof()
                self._maybe_done(stream)
        elif kind is ev.StreamReset:
            if stream is not None:
                self.streams.pop(stream.id, None)
                self._blocked.discard(stream.id)
                if event.error_code == h2_core.REFUSED_STREAM and not stream.head.done():
                    self._fail(stream, NotSent(f"{self._pool.endpoint} refused the stream"))
                else:
                    self._fail(
                        stream, StreamReset(f"{self._pool.endpoint} reset the stream ({event.error_code!r})")
                    )
                self._after_stream()
        elif kind is ev.WindowUpdated:
            if event.stream_id == 0:
                for stream_id in list(self._blocked):
                    self.flush_stream(stream_id)
            elif event.stream_id in self._blocked:
                self.flush_stream(event.stream_id)
        elif kind is ev.ConnectionTerminated:
            last = event.last_stream_id
            self.goaway = last
            for stream_id, excluded in list(self.streams.items()):
                if stream_id > last:  # never processed: the caller may send it elsewhere
                    self.streams.pop(stream_id, None)
                    self._fail(excluded, NotSent(f"{self._pool.endpoint} is going away (GOAWAY)"))
            self._pool.going_away(self)
            self._after_stream()
        elif kind is ev.RemoteSettingsChanged:
            if not self.settings.done():
                self.settings.set_result(None)
            self._pool.wake()

    # -- streams ------------------------------------------------------------------------

    def open_stream(self, fields: list[tuple[bytes, bytes]], end: bool) -> _Stream:
        if self.capacity <= 0:
            raise NotSent(f"the connection to {self._pool.endpoint} takes no new streams")
        stream_id = self._h2.get_next_available_stream_id()
        stream = _Stream(stream_id, self._loop, self)
        self._h2.send_headers(stream_id, fields, end_stream=end)
        if end:
            stream.out.end = True
        self.streams[stream_id] = stream
        self.idle_since = None
        self._flush()
        return stream

    async def write(self, stream: _Stream, data: bytes, end: bool) -> None:
        if stream.id not in self.streams:
            raise ConnectionResetError(
                f"{self._pool.endpoint} closed the stream while the request body was sent"
            )
        out = stream.out
        if data:
            out.data.append(data)
            out.size += len(data)
        out.end = end
        self.flush_stream(stream.id)
        while out.size >= h2_core.OUT_HIGH and stream.id in self.streams:
            out.waiter = self._loop.create_future()
            try:
                await out.waiter
            finally:
                out.waiter = None
        if stream.id not in self.streams and (out.size or not stream.body.is_eof()) and not out.end:
            raise ConnectionResetError(
                f"{self._pool.endpoint} closed the stream while the request body was sent"
            )
        if self._paused:
            waiter = self._loop.create_future()
            self._drain.append(waiter)
            await waiter

    def send_whole(self, stream: _Stream, data: bytes) -> None:
        """The whole request body and its end, sent as the windows allow."""
        out = stream.out
        if data:
            out.data.append(data)
            out.size += len(data)
        out.end = True
        self.flush_stream(stream.id)

    def flush_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self._blocked.discard(stream_id)
            return
        try:
            ended = h2_core.flush_stream(self._h2, stream_id, stream.out)
        except (h2_core.ProtocolError, KeyError):
            self._blocked.discard(stream_id)
            return
        if stream.out.data:
            self._blocked.add(stream_id)
        else:
            self._blocked.discard(stream_id)
        if ended:
            self._maybe_done(stream)
        self._flush()

    def ack(self, stream_id: int, length: int) -> None:
        if self.transport is None or not length:
            return
        try:
            self._h2.acknowledge_received_data(length, stream_id)
        except (h2_core.ProtocolError, KeyError):
            self._h2.increment_flow_control_window(length)
        self._flush()

    def reset(self, stream: _Stream) -> None:
        """Give up on a stream (the caller left, or a timeout): CANCEL, nothing else."""
        if self.streams.pop(stream.id, None) is None:
            return
        self._blocked.discard(stream.id)
        try:
            self._h2.reset_stream(stream.id, h2_core.CANCEL)
        except (h2_core.ProtocolError, KeyError):
            pass
        self._fail(stream, StreamReset("the stream was cancelled"))
        self._flush()
        self._after_stream()

    def _maybe_done(self, stream: _Stream) -> None:
        """Both directions ended: the stream's slot is free (what it received may still
        wait in its body for the relay)."""
        if stream.body.ended and stream.out.end and not stream.out.data and stream.id in self.streams:
            self.streams.pop(stream.id, None)
            self._blocked.discard(stream.id)
            self._after_stream()

    def _after_stream(self) -> None:
        if not self.streams:
            self.idle_since = self._loop.time()
            if self.goaway is not None and self.transport is not None:
                self._flush_now()
                self.transport.close()
        self._pool.wake()

    def _fail(self, stream: _Stream, exc: BaseException) -> None:
        if not stream.head.done():
            stream.head.set_exception(exc)
            stream.head.exception()  # retrieved: a stream nobody waits for is not an error
        stream.body.set_exception(exc)
        stream.out.wake()
        writer = stream.writer
        if writer is not None and not writer.done():
            writer.cancel()

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

    def close(self) -> None:
        if self.transport is not None:
            try:
                self._h2.close_connection()
                self._flush_now()
            except h2_core.ProtocolError:
                pass
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class H2Response:
    """The answer of one stream, with the interface of client.UpstreamResponse, plus the
    trailers (known once the body ended)."""

    __slots__ = ("_conn", "_stream", "content", "endpoint", "headers", "reason", "status")

    def __init__(
        self,
        conn: H2ClientConnection,
        stream: _Stream,
        endpoint: str,
        status: int,
        headers: list[tuple[str, str]],
    ) -> None:
        self._conn = conn
        self._stream = stream
        self.endpoint = endpoint
        self.status = status
        self.reason: str | None = None
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.content = stream.body

    def __repr__(self) -> str:
        return f"<H2Response {self.status} from {self.endpoint}>"

    @property
    def trailers(self) -> list[tuple[str, str]] | None:
        return self._stream.trailers

    def release(self) -> None:
        """The relay is done: a stream not ended both ways is cancelled."""
        stream = self._stream
        if not (stream.body.ended and stream.out.end and not stream.out.data):
            self._conn.reset(stream)

    def close(self) -> None:
        self._conn.reset(self._stream)


class H2Pool:
    """HTTP/2 connections to one endpoint."""

    def __init__(
        self,
        endpoint: str,
        *,
        max_connections: int,
        keepalive_timeout: float,
        connect_timeout: float,
        on_empty: Callable[[H2Pool], None] | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.key = endpoint
        self.tls = tls
        self.host, self.port = split_endpoint(endpoint)
        self.loop = asyncio.get_running_loop()
        self._max = max_connections
        self._keepalive = keepalive_timeout
        self._connect_timeout = connect_timeout
        self._on_empty = on_empty
        self.connections: list[H2ClientConnection] = []
        self._connecting: asyncio.Future[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    def __repr__(self) -> str:
        streams = sum(len(conn.streams) for conn in self.connections)
        return f"<H2Pool {self.endpoint} connections={len(self.connections)} streams={streams}>"

    async def exchange(
        self,
        conn: H2ClientConnection,
        method: str,
        authority: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterable[bytes] | None,
        deadline: float | None,
        *,
        te_trailers: bool = False,
        whole: bytes | None = None,
    ) -> H2Response:
        """Open a stream on `conn` (from `connection`), send the request, wait (until the
        loop time `deadline`) for the response head. Raises NotSent, HeadTimeout,
        StreamReset (a ConnectionResetError), or what the request body raised. `whole`:
        a body that is all here already, sent at once (no task to stream it)."""
        scheme = "http" if self.tls is None else "https"
        fields = h2_core.to_h2(method, scheme, authority, path, headers, te_trailers)
        stream = conn.open_stream(fields, end=body is None and whole is None)
        if whole is not None:
            conn.send_whole(stream, whole)
        elif body is not None:
            stream.writer = self.loop.create_task(_send_body(conn, stream, body))
        timer = None if deadline is None else self.loop.call_at(deadline, _head_timeout, stream)
        try:
            while True:
                pseudo, regular, ended = await stream.head
                status = int(pseudo.get(":status", "0"))
                if status >= 200 or status == 101:
                    break
                stream.head = self.loop.create_future()  # an informational answer: the next one
        except BaseException:
            conn.reset(stream)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if ended:
            stream.body.feed_eof()
            conn._maybe_done(stream)
        return H2Response(conn, stream, self.endpoint, status, regular)

    async def connection(self, deadline: float | None) -> H2ClientConnection:
        """A connection that takes another stream: an open one, a new one, or the next
        one with room, before the connect timeout or `deadline`. Raises PoolTimeout,
        ConnectTimeout, PeerRejected, NoHttp2 or OSError: nothing was sent."""
        loop = self.loop
        connect_by = loop.time() + self._connect_timeout
        give_up = connect_by if deadline is None else min(deadline, connect_by)
        while True:
            tls = self.tls
            best = None
            for conn in self.connections:
                if conn.capacity > 0 and (tls is None or conn.tls_generation == tls.generation):
                    if best is None or len(conn.streams) < len(best.streams):
                        best = conn
                        if not conn.streams:
                            break
            if best is not None:
                return best
            if self._connecting is not None:
                try:
                    async with asyncio.timeout_at(give_up):
                        await asyncio.shield(self._connecting)
                except TimeoutError:
                    raise ConnectTimeout() from None
                continue
            if len(self.connections) < self._max:
                self._connecting = loop.create_future()
                try:
                    conn = await self._connect(give_up)
                finally:
                    done, self._connecting = self._connecting, None
                    if not done.done():
                        done.set_result(None)
                self.connections.append(conn)
                return conn
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(give_up):
                    await waiter
            except TimeoutError:
                raise PoolTimeout() from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self, until: float) -> H2ClientConnection:
        loop = self.loop
        tls = self.tls
        try:
            async with asyncio.timeout_at(until):
                if tls is None:
                    transport, conn = await loop.create_connection(
                        lambda: H2ClientConnection(self), self.host, self.port
                    )
                else:
                    transport, conn = await loop.create_connection(
                        lambda: H2ClientConnection(self),
                        self.host,
                        self.port,
                        ssl=tls.h2_context(),
                        server_hostname="",
                    )
        except TimeoutError:
            raise ConnectTimeout() from None
        try:
            if tls is not None:
                conn.tls_generation = tls.generation
                ssl_object = transport.get_extra_info("ssl_object")
                tls.check_peer(peer_certificate(ssl_object))
                if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                    raise NoHttp2(f"{self.endpoint} did not agree to HTTP/2 (ALPN)")
            # its SETTINGS first: until then its stream limit is not known
            async with asyncio.timeout_at(until):
                await asyncio.shield(conn.settings)
        except TimeoutError:
            transport.abort()
            raise ConnectTimeout() from None
        except BaseException:
            transport.abort()
            raise
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_sweep()
        return conn

    # -- connections' news --------------------------------------------------------------

    def wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def going_away(self, conn: H2ClientConnection) -> None:
        self.wake()

    def lost(self, conn: H2ClientConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self.wake()
        if not self.connections and self._on_empty is not None and not self._waiters:
            self._on_empty(self)

    def _arm_sweep(self) -> None:
        if self._sweep is None and not self.closed:
            self._sweep = self.loop.call_later(min(1.0, self._keepalive / 2), self._close_idle)

    def _close_idle(self) -> None:
        """Connections without a stream for the keep-alive timeout are closed."""
        self._sweep = None
        now = self.loop.time()
        tls = self.tls
        for conn in list(self.connections):
            idle = conn.idle_since is not None and now - conn.idle_since >= self._keepalive
            stale = tls is not None and conn.tls_generation != tls.generation and not conn.streams
            if idle or stale:
                conn.close()
        if self.connections:
            self._arm_sweep()

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.connections):
            conn.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the forwarder closed"))


def _head_timeout(stream: _Stream) -> None:
    if not stream.head.done():
        stream.head.set_exception(HeadTimeout())


async def _send_body(conn: H2ClientConnection, stream: _Stream, body: AsyncIterable[bytes]) -> None:
    try:
        async for chunk in body:
            if chunk:
                await conn.write(stream, chunk, False)
        await conn.write(stream, b"", True)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The request cannot be completed: the answer (if any) is not trustworthy.
        if not stream.head.done():
            stream.head.set_exception(exc)
        stream.body.set_exception(exc)
        conn.reset(stream)
