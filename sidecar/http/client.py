"""A lean HTTP/1.1 client for the forwarder: keep-alive connections pooled per endpoint.

The request head is written here, in one `write`; the response is parsed by aiohttp's own
connection protocol (`ResponseHandler`, llhttp in C), so framing (Content-Length, chunked,
close-delimited), read timeouts and flow control stay aiohttp's, and so do its errors
(ServerDisconnectedError, ClientPayloadError, ClientOSError, SocketTimeoutError...), which
`Forwarder.open` turns into ForwardErrors.

Rules of this file:
- at most `max_connections` connections per endpoint; a request beyond that waits for one
  (the bound on waiting requests is the Forwarder's `_in_flight`);
- an idle connection is closed after `keepalive_timeout`, shorter than the apps' own idle
  timeouts, so that a request never races the app's close;
- a connection is reused only when its response was read to the end, its request body was
  sent whole, and neither side asked to close.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import socket
from collections.abc import AsyncIterable, Callable
from typing import Any

from aiohttp.client_exceptions import ClientConnectionResetError, ClientPayloadError
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import EMPTY_BODY_METHODS
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from .tls import ClientTLS, PeerRejected, peer_certificate

# methods for which aiohttp's client sent no `Content-Length: 0` without a body
_NO_LENGTH_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
READ_BUFSIZE = 2**16


class HeadTimeout(TimeoutError):
    """No response head within the per-try timeout."""


class ConnectTimeout(TimeoutError):
    """The TCP connect did not finish within the connect timeout (or the per-try deadline)."""


class PoolTimeout(TimeoutError):
    """No pooled connection came free within the connect timeout (or the per-try deadline)."""


class NotSent(ConnectionError):
    """The connection closed before a byte of the request was written."""


class BadRequestHead(ValueError):
    """A header or target that would break the request's framing (CR or LF)."""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class UpstreamResponse:
    """The answer of one attempt: status, reason, headers and the body as a StreamReader.

    `release()` returns the connection to its pool when the exchange finished cleanly,
    otherwise closes it; `close()` always closes it. Both are idempotent.
    """

    __slots__ = ("_conn", "_pool", "_writer", "content", "endpoint", "headers", "reason", "status")

    def __init__(
        self,
        pool: Pool,
        conn: ResponseHandler,
        writer: asyncio.Task[None] | None,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._pool = pool
        self._conn: ResponseHandler | None = conn
        self._writer = writer
        self.endpoint = pool.endpoint
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} from {self.endpoint}>"

    def release(self) -> None:
        self._give_back(self._complete())

    def close(self) -> None:
        self._give_back(False)

    def _complete(self) -> bool:
        """Whether both the request body and the answer went through whole."""
        writer = self._writer
        return self.content.is_eof() and (writer is None or writer.done())

    def _give_back(self, reusable: bool) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        complete = self._complete()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        # an exchange abandoned half way is reset, so that the peer stops working on it
        self._pool.put(conn, reusable, abandon=not complete)


class Pool:
    """Keep-alive connections to one endpoint."""

    # TLS exchanges given up on, by every pool of the process: each leaves reference
    # cycles (uvloop's SSL protocol and ours) for the cycle collector (see
    # sidecar.runtime.collect_cycles)
    abandoned_tls = 0

    def __init__(
        self,
        endpoint: str,
        *,
        max_connections: int,
        keepalive_timeout: float,
        connect_timeout: float,
        read_timeout: float,
        on_empty: Callable[[Pool], None] | None = None,
        tls: ClientTLS | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.key = endpoint  # the owner's name for this pool
        self.tls = tls
        self._on_empty = on_empty
        self.host, self.port = split_endpoint(endpoint)
        self.loop = asyncio.get_running_loop()
        self._max = max_connections
        self._keepalive = keepalive_timeout
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: collections.deque[tuple[ResponseHandler, float]] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[ResponseHandler | None]] = collections.deque()
        # When each waiter gives up: a heap of (loop time, seq, waiter, error) under one
        # timer for the earliest, instead of a timer per waiting request. Entries of
        # waiters served meanwhile are dropped when they reach the top.
        self._expiry: list[tuple[float, int, asyncio.Future[Any], type[Exception]]] = []
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_when = 0.0
        self._seq = itertools.count()
        self._cleanup: asyncio.TimerHandle | None = None
        self.size = 0  # open connections, idle or busy, plus connects under way
        self.closed = False

    def __repr__(self) -> str:
        return f"<Pool {self.endpoint} size={self.size} idle={len(self._idle)} waiting={len(self._waiters)}>"

    # -- connections -------------------------------------------------------------------

    def idle(self) -> ResponseHandler | None:
        """An idle connection that is still open, or None (then `acquire`)."""
        idle = self._idle
        if idle:
            now = self.loop.time()
            tls = self.tls
            while idle:
                conn, expires = idle.pop()
                if expires > now and conn.is_connected() and (tls is None or _current(conn, tls)):
                    return conn
                conn.close()
                self._lost(conn)
        return None

    async def acquire(self, deadline: float | None) -> ResponseHandler:
        """An idle connection, a new one, or the next one released, before the connect
        timeout or the per-try `deadline`, whichever comes first. Raises PoolTimeout,
        ConnectTimeout or OSError: in every case nothing was sent."""
        ready = self.idle()
        if ready is not None:
            return ready
        loop = self.loop
        connect_by = loop.time() + self._connect_timeout
        if self.size >= self._max:
            waiter: asyncio.Future[ResponseHandler | None] = loop.create_future()
            self._waiters.append(waiter)
            give_up = connect_by if deadline is None else min(deadline, connect_by)
            self._give_up_at(give_up, waiter, PoolTimeout)
            try:
                got = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # handed a connection (or a slot) just as we gave up: pass it on
                    passed = waiter.result()
                    if passed is not None:
                        self.put(passed, True)
                    else:
                        self.size -= 1
                        self._wake()
                else:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
                raise
            if got is not None:
                return got
            # a slot was handed over (size already counts us): connect
        else:
            self.size += 1
        try:
            return await self._connect(connect_by, deadline)
        except BaseException:
            self.size -= 1
            self._wake()
            raise

    def _give_up_at(self, when: float, waiter: asyncio.Future[Any], error: type[Exception]) -> None:
        heapq.heappush(self._expiry, (when, next(self._seq), waiter, error))
        if self._expiry_timer is None or when < self._expiry_when:
            self._arm_expiry(when)

    def _arm_expiry(self, when: float) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_when = when
        self._expiry_timer = self.loop.call_at(when, self._expire_waiters)

    def _expire_waiters(self) -> None:
        self._expiry_timer = None
        heap = self._expiry
        now = self.loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            _when, _seq, waiter, error = heapq.heappop(heap)
            _fail(waiter, error)
        if heap:
            self._arm_expiry(heap[0][0])

    def _drop_served(self) -> None:
        """Forget the expiries of waiters already served (FIFO: usually the earliest)."""
        heap = self._expiry
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        if not heap and self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None

    async def _connect(self, connect_by: float, deadline: float | None) -> ResponseHandler:
        loop = self.loop
        until = connect_by if deadline is None else min(connect_by, deadline)
        tls = self.tls
        try:
            async with asyncio.timeout_at(until):
                if tls is None:
                    _transport, conn = await loop.create_connection(
                        lambda: ResponseHandler(loop), self.host, self.port
                    )
                else:
                    _transport, conn = await loop.create_connection(
                        lambda: ResponseHandler(loop),
                        self.host,
                        self.port,
                        ssl=tls.context(),
                        server_hostname="",
                    )
        except TimeoutError:
            raise ConnectTimeout() from None
        if tls is not None:
            conn.tls_generation = tls.generation  # type: ignore[attr-defined]
            try:
                tls.check_peer(peer_certificate(_transport.get_extra_info("ssl_object")))
            except PeerRejected:
                _transport.abort()
                raise
        sock = _transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def put(self, conn: ResponseHandler, reusable: bool, abandon: bool = False) -> None:
        """Give back a connection after an exchange: pooled when `reusable`, else closed;
        `abandon`: the exchange did not finish, so reset the connection instead."""
        if (
            reusable
            and not self.closed
            and not conn.should_close
            and conn.is_connected()
            and (self.tls is None or _current(conn, self.tls))
        ):
            waiters = self._waiters
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    self._drop_served()
                    return
            expires = self.loop.time() + self._keepalive
            self._idle.append((conn, expires))
            if self._cleanup is None:
                self._cleanup = self.loop.call_at(expires, self._expire)
            return
        if abandon:
            conn.abort()
            if self.tls is not None:
                Pool.abandoned_tls += 1
        else:
            conn.close()
        self._lost(conn)

    def _lost(self, conn: ResponseHandler) -> None:
        self.size -= 1
        self._wake()
        self._maybe_empty()

    def _maybe_empty(self) -> None:
        if self.size == 0 and not self._idle and not self._waiters and self._on_empty is not None:
            self._on_empty(self)

    def _wake(self) -> None:
        """A slot is free: let the first waiter connect."""
        waiters = self._waiters
        while waiters and self.size < self._max:
            waiter = waiters.popleft()
            if not waiter.done():
                self.size += 1
                waiter.set_result(None)
                self._drop_served()
                return

    def _expire(self) -> None:
        self._cleanup = None
        idle = self._idle
        now = self.loop.time()
        while idle and (idle[0][1] <= now or not idle[0][0].is_connected()):
            conn, _ = idle.popleft()
            conn.close()
            self._lost(conn)
        if idle:
            self._cleanup = self.loop.call_at(idle[0][1], self._expire)
        else:
            self._maybe_empty()

    def close(self) -> None:
        self.closed = True
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self._expiry.clear()
        if self._cleanup is not None:
            self._cleanup.cancel()
            self._cleanup = None
        while self._idle:
            conn, _ = self._idle.popleft()
            conn.close()
            self.size -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ClientConnectionResetError("the forwarder closed"))

    # -- one exchange ------------------------------------------------------------------

    async def exchange(
        self,
        conn: ResponseHandler,
        method: str,
        head: bytes,
        chunked: bool,
        body: AsyncIterable[bytes] | None,
        deadline: float | None,
    ) -> UpstreamResponse:
        """Send one request on `conn` (from `acquire`) and wait until the loop time
        `deadline` for its response head. `head` comes from `request_head`."""
        loop = self.loop
        writer: asyncio.Task[None] | None = None
        handle: asyncio.TimerHandle | None = None
        try:
            # The wait for the head is bounded by `deadline`; aiohttp's idle read timeout
            # (a timer re-armed on every read) only guards a body that is still coming.
            conn.set_response_params(
                skip_payload=method in EMPTY_BODY_METHODS,
                read_until_eof=True,
                auto_decompress=False,
                read_timeout=self._read_timeout if deadline is None else None,
                read_bufsize=READ_BUFSIZE,
            )
            transport = conn.transport
            if transport is None or transport.is_closing():
                raise NotSent("the connection closed before the request was sent")
            transport.write(head)
            if deadline is None:
                conn.start_timeout()
            if body is not None:
                writer = loop.create_task(_send_body(conn, body, chunked))
                writer.add_done_callback(lambda task: _body_done(task, conn))
            if deadline is not None:
                handle = loop.call_at(deadline, _head_timeout, conn)
            while True:
                message, payload = await conn.read()
                code = message.code
                if code < 100 or code > 199 or code == 101:
                    break
        except BaseException:
            if handle is not None:
                handle.cancel()
            if writer is not None and not writer.done():
                writer.cancel()
            # A reset, not a close: the peer (a sidecar or an app) must see that the
            # request was abandoned, not a half-close after which it would still answer.
            self.put(conn, False, abandon=True)
            raise
        if handle is not None:
            handle.cancel()
        if deadline is not None and not payload.is_eof():
            conn.read_timeout = self._read_timeout
            conn.start_timeout()  # dropped by aiohttp when the body ends
        return UpstreamResponse(self, conn, writer, code, message.reason, message.headers, payload)


def _current(conn: ResponseHandler, tls: ClientTLS) -> bool:
    """Whether `conn` was made with the current certificate: after a rotation, pooled
    connections of the old one are closed rather than reused, so they are replaced."""
    return bool(getattr(conn, "tls_generation", 0) == tls.generation)


def _fail(waiter: asyncio.Future[Any], exc: type[BaseException]) -> None:
    if not waiter.done():
        waiter.set_exception(exc())


def _head_timeout(conn: ResponseHandler) -> None:
    conn.set_exception(HeadTimeout())


def _body_done(task: asyncio.Task[None], conn: ResponseHandler) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        # The request cannot be completed: the response (if any) is not trustworthy.
        payload = conn._payload
        conn.set_exception(exc)
        if payload is not None and not payload.is_eof():
            payload.set_exception(ClientPayloadError(f"the request body failed: {exc}"))
        conn.abort()


async def _send_body(conn: ResponseHandler, body: AsyncIterable[bytes], chunked: bool) -> None:
    async for chunk in body:
        if not chunk:
            continue
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("the app closed the connection while the request body was sent")
        if chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            transport.write(chunk)
        if conn.writing_paused:
            await conn._drain_helper()
    if chunked:
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("the app closed the connection while the request body was sent")
        transport.write(b"0\r\n\r\n")


def request_head(method: str, path: str, headers: CIMultiDict[str], endpoint: str, has_body: bool) -> bytes:
    """The request line and headers, with the framing of the body. Raises BadRequestHead."""
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if "Host" not in headers:
        lines.append(f"Host: {endpoint}")
    if has_body:
        if "Content-Length" not in headers:
            lines.append("Transfer-Encoding: chunked")
    elif method not in _NO_LENGTH_METHODS:
        lines.append("Content-Length: 0")
    lines.append("\r\n")
    text = "\r\n".join(lines)
    # Every line ends in exactly one CRLF: no CR or LF inside a target, name or value.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise BadRequestHead("a request header or target contains CR or LF")
    return text.encode("utf-8", "surrogateescape")
