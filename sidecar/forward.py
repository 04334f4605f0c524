"""The hot path: one request streamed to one endpoint, and its response streamed back.

Rules of this file (RFC 9110 section 7.6.1, RFC 9112):
- bodies are streamed in both directions, never read whole;
- hop-by-hop headers (Connection, every header it names, Keep-Alive, Proxy-*, TE,
  Transfer-Encoding, Upgrade, Trailer) never cross the sidecar in either direction, and
  the body is re-framed by each side's own HTTP stack;
- X-Forwarded-For is appended to, X-Forwarded-Proto and X-Forwarded-Host are set, and one
  X-Request-Id travels with the request and comes back on the response;
- every failure to reach the endpoint becomes a SidecarError (502/504) before any byte of
  the response is sent; after that, the only honest signal is an aborted connection.

Inbound and outbound both call `Forwarder.forward`; the performance work may replace
this module's internals, not its interface.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Literal

import aiohttp
from aiohttp import http_exceptions
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import (
    BadRequest,
    ClientClosed,
    ExpectationFailed,
    PayloadTooLarge,
    PeerIdentityMismatch,
    RequestTimeout,
    SidecarError,
    UpstreamConnectError,
    UpstreamPoolFull,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .http.client import (
    BadRequestHead,
    ConnectTimeout,
    NotSent,
    Pool,
    PoolTimeout,
    UpstreamResponse,
    request_head,
)
from .http.h2_client import H2Pool, H2Response, NoHttp2
from .http.h2_core import StreamBody
from .http.headers import REQUEST_ID, only_chunked, request_headers, response_headers
from .http.messages import Request, Response
from .http.tls import ClientTLS, PeerRejected

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# How an attempt failed before any response:
#   "connect_failure"  no connection to the endpoint (refused, unreachable, connect
#                      timeout): never sent, and the endpoint's fault;
#   "unsent"           never sent, and not the endpoint's fault (our pool to it is full,
#                      the wait for a pooled connection ran out, or the connection closed
#                      before a byte of the request was written);
#   "reset"            the connection broke, maybe after the app saw the request;
#   "timeout"          no response headers in time;
#   "refused"          the sidecar itself refused the request (too large, the client left).
AttemptFailure = Literal["connect_failure", "unsent", "reset", "timeout", "refused"]
# How an endpoint is spoken to: HTTP/1.1, or HTTP/2 (h2c to an app, h2 over the mesh's TLS).
Protocol = Literal["http1", "h2"]


class Forwarder:
    """Keep-alive pools (one per endpoint, see http.client.Pool) and the streaming copy loop,
    shared by one listener."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        keepalive_timeout: float = 4.0,
        max_body: int = 1024**3,
        body_timeout: float = 30.0,
        write_timeout: float = 30.0,
        max_connections: int = 256,
        max_pending: int = 1024,
        to_app: bool = False,
        stream_idle_timeout: float = 300.0,
    ) -> None:
        # gRPC streams may be quiet for long: their body waits get this instead
        self._stream_idle_timeout = stream_idle_timeout
        # the inbound forwarder talks to our own app: see response_headers(from_app)
        self._to_app = to_app
        self._max_body = max_body
        self._body_timeout = body_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections
        self._max_in_flight = max_connections + max_pending
        # requests per endpoint from open() until their response is relayed or dropped
        self._in_flight: dict[str, int] = {}
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        # shorter than Node's default 5 s, so that we close an idle connection before the
        # app does and never race it with a request
        self._keepalive_timeout = keepalive_timeout
        self._pools: dict[str, Pool] | None = None
        self._h2_pools: dict[str, H2Pool] = {}

    def __repr__(self) -> str:
        return f"<Forwarder active={self.active} open={self._pools is not None}>"

    @property
    def h2_streams(self) -> int:
        """HTTP/2 streams open to upstreams (a stream lives from its request to the end of
        both directions)."""
        return sum(len(conn.streams) for pool in self._h2_pools.values() for conn in pool.connections)

    @property
    def active(self) -> int:
        """Requests between open() and the end of their relay (or their failure)."""
        return sum(self._in_flight.values())

    async def start(self) -> None:
        self._pools = {}

    async def close(self) -> None:
        if self._pools is not None:
            for pool in self._pools.values():
                pool.close()
            self._pools = None
        for h2_pool in self._h2_pools.values():
            h2_pool.close()
        self._h2_pools = {}

    def _pool(self, endpoint: str, tls: ClientTLS | None) -> Pool:
        pools = self._pools
        assert pools is not None, "Forwarder.start() was not awaited"
        # one pool per endpoint and way of talking to it (plaintext, or TLS to a service)
        key = endpoint if tls is None else f"{endpoint} {tls.service}"
        pool = pools.get(key)
        if pool is None:
            pool = pools[key] = Pool(
                endpoint,
                max_connections=self._max_connections,
                keepalive_timeout=self._keepalive_timeout,
                connect_timeout=self._connect_timeout,
                read_timeout=self._request_timeout,
                on_empty=self._drop_pool,
                tls=tls,
            )
            pool.key = key
        return pool

    def _h2_pool(self, endpoint: str, tls: ClientTLS | None) -> H2Pool:
        key = endpoint if tls is None else f"{endpoint} {tls.service}"
        pool = self._h2_pools.get(key)
        if pool is None:
            pool = self._h2_pools[key] = H2Pool(
                endpoint,
                max_connections=max(1, self._max_connections // 64),
                keepalive_timeout=self._keepalive_timeout,
                connect_timeout=self._connect_timeout,
                on_empty=self._drop_h2_pool,
                tls=tls,
            )
            pool.key = key
        return pool

    def _drop_h2_pool(self, pool: H2Pool) -> None:
        if self._h2_pools.get(pool.key) is pool:
            del self._h2_pools[pool.key]

    def _drop_pool(self, pool: Pool) -> None:
        """An endpoint's pool holds nothing any more: forget it, so that instances that come
        and go do not grow the dict for the life of the process."""
        if self._pools is not None and self._pools.get(pool.key) is pool:
            del self._pools[pool.key]

    async def forward(
        self,
        request: Request,
        endpoint: str,
        path: str,
        *,
        host: str | None = None,
        extra_headers: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
        tls: ClientTLS | None = None,
        protocol: Protocol = "http1",
    ) -> Response:
        """One attempt: send `request` to `http(s)://<endpoint><path>`, stream the answer back."""
        headers, request_id = request_headers(request, host)
        for key, value in extra_headers:
            headers[key] = value
        body = self.body(request)
        # No retry here: the caller's sidecar decides retries with the whole picture
        # (idempotency, budget, other instances), so a request reaches the app at most once
        # per attempt.
        try:
            upstream = await self.open(
                request.method,
                endpoint,
                path,
                headers,
                body,
                timeout,
                tls,
                protocol,
                protocol == "h2" and te_trailers(request),
            )
        except ForwardError as err:
            raise err.error from err
        return await self.relay(request, upstream, request_id, body)

    def body(self, request: Request) -> LimitedBody | None:
        """The request body as a byte stream with the size limit applied, or None.

        A declared length over the limit is refused before anything is read (and before a
        100 Continue); a chunked body is counted while it streams.
        """
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            raise ExpectationFailed(f"unsupported expectation {expect!r}")
        length = request.content_length
        if length is not None and length > self._max_body:
            raise PayloadTooLarge(f"request body of {length} bytes is over the {self._max_body}-byte limit")
        if not request.body_exists:
            return None
        if expect is not None and request.version >= (1, 1):
            request.send_continue()
        timeout = self._stream_idle_timeout if getattr(request, "grpc", False) else self._body_timeout
        return LimitedBody(request.content, self._max_body, timeout)

    async def open(
        self,
        method: str,
        endpoint: str,
        path: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
        timeout: float | None = None,
        tls: ClientTLS | None = None,
        protocol: Protocol = "http1",
        te: bool = False,
    ) -> UpstreamResponse | H2Response:
        """Send the request and wait for the response's headers. Raises ForwardError.

        `timeout` bounds the wait for the response headers (the per-try timeout); the
        body then streams with the idle read timeout of the pool. With `tls`, the
        connection is mutual TLS and the peer must present `tls.service`'s identity.
        """
        in_flight = self._in_flight.get(endpoint, 0)
        if in_flight >= self._max_in_flight:
            raise ForwardError(
                "unsent", UpstreamPoolFull(f"{in_flight} requests already waiting for {endpoint}")
            )
        if protocol == "h2":
            self._in_flight[endpoint] = in_flight + 1
            try:
                return await self._open_h2(method, endpoint, path, headers, body, timeout, tls, te)
            except BaseException:
                self._done(endpoint)
                raise
        pool = self._pool(endpoint, tls)
        try:
            head = request_head(method, path, headers, endpoint, body is not None)
        except BadRequestHead as exc:
            raise ForwardError("refused", BadRequest(str(exc))) from exc
        self._in_flight[endpoint] = in_flight + 1
        opened = False
        # pool.loop, not asyncio.get_running_loop(): that costs a getpid() system call on
        # Python 3.11, and system calls are the dearest thing on this path
        deadline = None if timeout is None else pool.loop.time() + timeout
        try:
            try:
                conn = pool.idle()  # (a ResponseHandler is falsy while its queue is empty)
                if conn is None:
                    conn = await pool.acquire(deadline)
            except PoolTimeout as exc:
                waited = UpstreamTimeout(f"timed out waiting for a free connection to {endpoint}")
                raise ForwardError("unsent", waited) from exc
            except ConnectTimeout as exc:
                timed_out = UpstreamTimeout(f"timed out connecting to {endpoint}")
                raise ForwardError("connect_failure", timed_out) from exc
            except PeerRejected as exc:
                mismatch = PeerIdentityMismatch(f"{endpoint}: {exc}")
                raise ForwardError("connect_failure", mismatch) from exc
            except OSError as exc:
                refused = UpstreamConnectError(f"cannot connect to {endpoint}: {_reason(exc)}")
                raise ForwardError("connect_failure", refused) from exc
            chunked = body is not None and "Content-Length" not in headers
            response = await pool.exchange(conn, method, head, chunked, body, deadline)
            opened = True
            return response
        except ForwardError:
            raise
        except NotSent as exc:
            raise ForwardError("unsent", UpstreamConnectError(f"{endpoint} closed the connection")) from exc
        except Exception as exc:
            broken = body.broken() if isinstance(body, LimitedBody) else None
            failure = ForwardError("refused", broken) if broken is not None else _translate(exc, endpoint)
            if failure is None:
                raise
            raise failure from exc
        finally:
            if not opened:
                self._done(endpoint)

    async def _open_h2(
        self,
        method: str,
        endpoint: str,
        path: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
        timeout: float | None,
        tls: ClientTLS | None,
        te: bool,
    ) -> H2Response:
        """The HTTP/2 attempt: a stream on a multiplexed connection. Raises ForwardError."""
        pool = self._h2_pool(endpoint, tls)
        deadline = None if timeout is None else pool.loop.time() + timeout
        try:
            conn = await pool.connection(deadline)
        except PoolTimeout as exc:
            waited = UpstreamTimeout(f"timed out waiting for a free HTTP/2 stream to {endpoint}")
            raise ForwardError("unsent", waited) from exc
        except ConnectTimeout as exc:
            raise ForwardError(
                "connect_failure", UpstreamTimeout(f"timed out connecting to {endpoint}")
            ) from exc
        except PeerRejected as exc:
            raise ForwardError("connect_failure", PeerIdentityMismatch(f"{endpoint}: {exc}")) from exc
        except NoHttp2 as exc:
            raise ForwardError("connect_failure", UpstreamConnectError(str(exc))) from exc
        except OSError as exc:
            refused = UpstreamConnectError(f"cannot connect to {endpoint}: {_reason(exc)}")
            raise ForwardError("connect_failure", refused) from exc
        authority = headers.get("Host") or endpoint
        try:
            # a body already here whole (a gRPC unary request, usually) goes out with the head
            whole = body.take_whole() if isinstance(body, LimitedBody) else None
            items = headers.items()
            return await pool.exchange(
                conn, method, authority, path, items, body, deadline, te_trailers=te, whole=whole
            )
        except NotSent as exc:
            raise ForwardError("unsent", UpstreamConnectError(f"{endpoint}: {exc}")) from exc
        except Exception as exc:
            broken = body.broken() if isinstance(body, LimitedBody) else None
            failure = ForwardError("refused", broken) if broken is not None else _translate(exc, endpoint)
            if failure is None:
                raise
            raise failure from exc

    def discard(self, upstream: UpstreamResponse | H2Response) -> None:
        """Drop an answer that will not be relayed (a retried 5xx): its connection, and
        its slot among the endpoint's requests in flight."""
        upstream.close()
        self._done(upstream.endpoint)

    def _done(self, endpoint: str) -> None:
        left = self._in_flight.get(endpoint, 1) - 1
        if left > 0:
            self._in_flight[endpoint] = left
        else:
            self._in_flight.pop(endpoint, None)

    async def relay(
        self,
        request: Request,
        upstream: UpstreamResponse | H2Response,
        request_id: str,
        body: LimitedBody | None = None,
    ) -> Response:
        """Stream `upstream`'s answer to the client; always releases `upstream`.

        When the request body broke a limit while streaming, the upstream's answer (often
        an error about the cut-off body) is dropped and the limit is reported instead.
        """
        try:
            broken = body.broken() if body is not None else None
            if broken is not None:
                raise broken
            return await self._relay(request, upstream, request_id)
        finally:
            if _short_keepalive(upstream.headers, self._keepalive_timeout):
                upstream.close()  # the app would close it before our pool reuses it
            else:
                upstream.release()
            self._done(upstream.endpoint)

    async def _relay(
        self, request: Request, upstream: UpstreamResponse | H2Response, request_id: str
    ) -> Response:
        upstream_headers = upstream.headers
        if "Transfer-Encoding" in upstream_headers:
            codings = upstream_headers.getall("Transfer-Encoding")
            if not only_chunked(codings):  # we cannot know where such a body ends
                raise UpstreamProtocolError(f"the app answered with Transfer-Encoding {', '.join(codings)!r}")
        status = upstream.status
        headers = response_headers(upstream_headers, request_id, self._to_app)
        response = Response(status, request_id=upstream_headers.get(REQUEST_ID, request_id), sent=True)
        if request.grpc:
            response.grpc_status = upstream_headers.get("grpc-status")  # trailers-only
        text = upstream_headers.get("Content-Length")
        length = int(text) if text is not None and text.isdigit() else None
        content = upstream.content
        transport = request.transport
        watchdog: asyncio.TimerHandle | None = None
        try:
            if content.is_eof():
                # The body arrived whole with its head: one write, with a Content-Length.
                data = content.read_nowait()  # all of it, in one call
                if length is None and request.method != "HEAD":
                    length = len(data)
                if transport is not None and not _fits(transport, data):
                    watchdog = _arm(transport, self._write_timeout)
                trailers = upstream.trailers if type(upstream) is H2Response else None
                if trailers is not None and request.grpc:
                    response.grpc_status = next((v for k, v in trailers if k == "grpc-status"), None)
                await request.start(
                    status, headers, length, reason=upstream.reason, data=data, end=True, trailers=trailers
                )
                return response
            await request.start(status, headers, length, reason=upstream.reason)
            write = request.write
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                if transport is None or _fits(transport, chunk):
                    await write(chunk)
                    continue
                # only a stalled write is timed, never the wait for the app's next bytes
                watchdog = _arm(transport, self._write_timeout)
                await write(chunk)
                watchdog.cancel()
                watchdog = None
            trailers = upstream.trailers if type(upstream) is H2Response else None
            if trailers is not None and request.grpc:
                response.grpc_status = next((v for k, v in trailers if k == "grpc-status"), None)
            await request.end(trailers)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            # Headers are gone already: the only honest answer is a broken connection,
            # never a clean-looking truncated body.
            if request.client_gone():
                log.debug("client %s left during the answer of %s", request.remote, upstream.endpoint)
            else:
                log.warning("upstream %s broke mid-response: %s", upstream.endpoint, _reason(exc))
            request.fail_answer(f"{upstream.endpoint} broke off its answer")
        finally:
            if watchdog is not None:
                watchdog.cancel()
        return response


# A write this small into a transport buffer this empty cannot reach the transport's high
# water mark (64 KiB), so it cannot wait for the client: no watchdog needed.
_SMALL_WRITE = 16 * 1024


def _fits(transport: asyncio.BaseTransport, data: bytes) -> bool:
    return len(data) < _SMALL_WRITE and transport.get_write_buffer_size() < _SMALL_WRITE  # type: ignore[attr-defined]


def _arm(transport: asyncio.BaseTransport, seconds: float) -> asyncio.TimerHandle:
    """A write watchdog: aborts the client connection when a write stalls for `seconds`."""
    return asyncio.get_running_loop().call_later(seconds, _stalled, transport)


def _stalled(transport: asyncio.BaseTransport) -> None:
    log.warning("a client stopped reading a response: closing its connection")
    transport.abort()  # type: ignore[attr-defined]


class ForwardError(Exception):
    """An attempt that failed before a response arrived: how (for retry decisions) and
    the SidecarError the caller should see if it is not retried."""

    def __init__(self, kind: AttemptFailure, error: SidecarError) -> None:
        super().__init__(error.message)
        self.kind = kind
        self.error = error


class LimitedBody:
    """A request body read from the client, counted against the size limit.

    `read()` is safe to cancel: a cancelled read loses nothing (the bytes stay in the
    client connection's reader), so the next attempt of a retried request reads on where
    the last one stopped. (An async generator would not do: cancelling one ends it, and
    the next attempt would take the rest of the body for its end.)
    """

    __slots__ = ("_content", "_limit", "_timeout", "client_left", "exceeded", "sent", "timed_out")

    def __init__(self, content: aiohttp.StreamReader | StreamBody, limit: int, timeout: float = 30.0) -> None:
        self._content = content
        self._limit = limit
        self._timeout = timeout
        self.sent = 0
        self.exceeded = False
        self.timed_out = False
        self.client_left = False

    def broken(self) -> SidecarError | None:
        """What went wrong with this body on the client's side (413, 408, the client left),
        if anything: whatever the upstream did next is a consequence, not the upstream's
        fault, and the request cannot be sent again."""
        if self.exceeded:
            return PayloadTooLarge(f"request body over the {self._limit}-byte limit")
        if self.timed_out:
            return RequestTimeout(f"no request body bytes for {self._timeout:g}s")
        if self.client_left:
            return ClientClosed("the client closed the connection while sending the request body")
        return None

    async def read(self) -> bytes:
        """The next chunk, b"" at the end. Raises the SidecarError of `broken()`."""
        content = self._content
        try:
            if type(content) is StreamBody and (content.buffered or content.ended):
                chunk = await content.readany()  # at once: no timer needed
            else:
                async with asyncio.timeout(self._timeout):
                    chunk = await content.readany()
        except TimeoutError:
            self.timed_out = True
            raise RequestTimeout(f"no request body bytes for {self._timeout:g}s") from None
        except (ConnectionError, RequestPayloadError, http_exceptions.HttpProcessingError) as exc:
            # the listener sets these on the reader when the client leaves mid-body (or
            # breaks its framing): the client's doing, never the endpoint's
            self.client_left = True
            raise ClientClosed("the client closed the connection while sending the request body") from exc
        if chunk:
            self.sent += len(chunk)
            if self.sent > self._limit:
                self.exceeded = True
                raise PayloadTooLarge(f"request body over the {self._limit}-byte limit")
        return chunk

    def take_whole(self) -> bytes | None:
        """All of the body at once when the client sent all of it already (an HTTP/2
        stream that ended), else None (then read it chunk by chunk). Raises PayloadTooLarge."""
        content = self._content
        if type(content) is not StreamBody or not content.ended or self.sent:
            return None
        data = content.read_nowait()
        self.sent = len(data)
        if self.sent > self._limit:
            self.exceeded = True
            raise PayloadTooLarge(f"request body over the {self._limit}-byte limit")
        return data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


def _translate(exc: Exception, endpoint: str) -> ForwardError | None:
    """The ForwardError for a failure of an exchange with `endpoint`, or None when `exc`
    is not one (a bug: let it propagate)."""
    if isinstance(exc, (PayloadTooLarge, RequestTimeout, ClientClosed)):
        return ForwardError("refused", exc)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ForwardError(
            "reset", UpstreamProtocolError(f"{endpoint} closed the connection without answering")
        )
    if isinstance(exc, (aiohttp.SocketTimeoutError, TimeoutError)):
        return ForwardError("timeout", UpstreamTimeout(f"timed out waiting for {endpoint}"))
    if isinstance(exc, http_exceptions.HttpProcessingError):
        return ForwardError(
            "reset", UpstreamProtocolError(f"{endpoint} sent a malformed response: {exc.message}")
        )
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return ForwardError("reset", UpstreamProtocolError(f"{endpoint} failed: {_reason(exc)}"))
    return None


def te_trailers(request: Request) -> bool:
    """Whether the client said it takes trailers (`TE: trailers`, which gRPC sends)."""
    value = request.headers.get("TE")
    return value is not None and "trailers" in value.lower()


def _short_keepalive(headers: CIMultiDictProxy[str], ours: float) -> bool:
    """Whether the peer announced (Keep-Alive: timeout=N) that it closes idle connections
    no later than our pool would: reusing such a connection races the peer's close."""
    value = headers.get("Keep-Alive")
    if not value:
        return False
    for part in value.split(","):
        key, _, number = part.strip().partition("=")
        if key.strip().lower() == "timeout":
            try:
                return float(number) <= ours
            except ValueError:
                return False
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
