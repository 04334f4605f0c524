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
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Literal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import (
    ExpectationFailed,
    PayloadTooLarge,
    RequestTimeout,
    SidecarError,
    UpstreamConnectError,
    UpstreamPoolFull,
    UpstreamProtocolError,
    UpstreamTimeout,
)

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
REQUEST_ID = "X-Request-Id"
# Header names the sidecar uses between its own hops; a caller may not set them.
INTERNAL_PREFIX = "x-sidecar-"
CHUNK = 64 * 1024
# How an attempt failed before any response: "connect_failure" (never sent), "reset"
# (the connection broke, maybe after the app saw the request), "timeout" (no response
# headers in time), "refused" (the sidecar itself refused the request, e.g. too large).
AttemptFailure = Literal["connect_failure", "reset", "timeout", "refused"]


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | connection_listed(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lowered = key.lower()
        if lowered in drop:
            continue
        out.add(key, value)
    return out


def _unverifiable_forwarding(name: str) -> bool:
    lowered = name.lower()
    if lowered in ("forwarded", "x-real-ip"):
        return True
    return lowered.startswith("x-forwarded-") and lowered != "x-forwarded-for"


def request_headers(request: web.BaseRequest, host: str | None) -> tuple[CIMultiDict[str], str]:
    """Headers to send upstream, and the request id they carry."""
    headers = strip_hop_by_hop(request.headers)
    headers.popall("Expect", None)  # answered by the sidecar itself (see Forwarder._body)
    for key in [k for k in headers if k.lower().startswith(INTERNAL_PREFIX)]:
        headers.popall(key)
    # Rack and Puma read '_' and '-' alike: a header with '_' could spoof a trusted one.
    # Forwarding facts other than the ones we set below cannot be verified: drop them.
    for key in [k for k in headers if "_" in k or _unverifiable_forwarding(k)]:
        headers.popall(key)
    peer = request.remote or ""
    prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    original_host = request.headers.get("Host")
    if original_host:
        headers["X-Forwarded-Host"] = original_host
    request_id = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
    headers[REQUEST_ID] = request_id
    if host is not None:
        headers["Host"] = host
    if not request.body_exists:
        headers.popall("Content-Length", None)
    return headers, request_id


def response_headers(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    headers = strip_hop_by_hop(upstream)
    headers.popall("Content-Length", None)  # set on the StreamResponse itself
    headers[REQUEST_ID] = upstream.get(REQUEST_ID, request_id)
    return headers


class Forwarder:
    """A keep-alive pool and the streaming copy loop, shared by one listener."""

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
    ) -> None:
        self._max_body = max_body
        self._body_timeout = body_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections
        self._max_in_flight = max_connections + max_pending
        # requests per endpoint from open() until their response is relayed or dropped
        self._in_flight: dict[str, int] = {}
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._keepalive_timeout = keepalive_timeout
        self._session: aiohttp.ClientSession | None = None
        self.active = 0

    def __repr__(self) -> str:
        return f"<Forwarder active={self.active} open={self._session is not None}>"

    async def start(self) -> None:
        # keepalive shorter than Node's default 5 s, so that we close an idle connection
        # before the app does and never race it with a request.
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=self._max_connections,
            keepalive_timeout=self._keepalive_timeout,
            use_dns_cache=False,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._connect_timeout, sock_read=self._request_timeout
            ),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self,
        request: web.BaseRequest,
        endpoint: str,
        path: str,
        *,
        host: str | None = None,
        extra_headers: Iterable[tuple[str, str]] = (),
        timeout: float | None = None,
    ) -> web.StreamResponse:
        """One attempt: send `request` to `http://<endpoint><path>`, stream the answer back."""
        headers, request_id = request_headers(request, host)
        for key, value in extra_headers:
            headers[key] = value
        body = await self.body(request)
        # No retry here: the caller's sidecar decides retries with the whole picture
        # (idempotency, budget, other instances), so a request reaches the app at most once
        # per attempt.
        try:
            upstream = await self.open(request.method, endpoint, path, headers, body, timeout)
        except ForwardError as err:
            raise err.error from err
        return await self.relay(request, upstream, request_id, body)

    async def body(self, request: web.BaseRequest) -> LimitedBody | None:
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
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return LimitedBody(request.content, self._max_body, self._body_timeout)

    async def open(
        self,
        method: str,
        endpoint: str,
        path: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
        timeout: float | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the request and wait for the response's headers. Raises ForwardError.

        `timeout` bounds the wait for the response headers (the per-try timeout); the
        body then streams with the idle read timeout of the pool.
        """
        assert self._session is not None, "Forwarder.start() was not awaited"
        url = f"http://{endpoint}{path}"
        in_flight = self._in_flight.get(endpoint, 0)
        if in_flight >= self._max_in_flight:
            raise ForwardError(
                "refused", UpstreamPoolFull(f"{in_flight} requests already waiting for {endpoint}")
            )
        self._in_flight[endpoint] = in_flight + 1
        self.active += 1
        opened = False
        try:
            async with asyncio.timeout(timeout):
                response = await self._session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                    chunked=None,
                    read_until_eof=True,
                    auto_decompress=False,
                    expect100=False,
                    proxy=None,
                )
            opened = True
            return response
        except (PayloadTooLarge, RequestTimeout) as exc:
            raise ForwardError("refused", exc) from exc
        except aiohttp.ClientPayloadError as exc:
            if isinstance(body, LimitedBody) and body.exceeded:
                raise ForwardError("refused", PayloadTooLarge(str(exc))) from exc
            if isinstance(body, LimitedBody) and body.timed_out:
                raise ForwardError("refused", RequestTimeout("the request body stalled")) from exc
            raise ForwardError("reset", UpstreamProtocolError(f"{endpoint} failed: {_reason(exc)}")) from exc
        except aiohttp.ServerDisconnectedError as exc:
            error = UpstreamProtocolError(f"{endpoint} closed the connection without answering")
            raise ForwardError("reset", error) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            timed_out = UpstreamTimeout(f"timed out connecting to {endpoint}")
            raise ForwardError("connect_failure", timed_out) from exc
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            refused = UpstreamConnectError(f"cannot connect to {endpoint}: {_reason(exc)}")
            raise ForwardError("connect_failure", refused) from exc
        except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
            raise ForwardError("timeout", UpstreamTimeout(f"timed out waiting for {endpoint}")) from exc
        except aiohttp.ClientResponseError as exc:
            error = UpstreamProtocolError(f"{endpoint} sent a malformed response: {exc.message}")
            raise ForwardError("reset", error) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(body, LimitedBody) and body.exceeded:
                raise ForwardError("refused", PayloadTooLarge("request body over the limit")) from exc
            if isinstance(body, LimitedBody) and body.timed_out:
                raise ForwardError("refused", RequestTimeout("the request body stalled")) from exc
            raise ForwardError("reset", UpstreamProtocolError(f"{endpoint} failed: {_reason(exc)}")) from exc
        finally:
            if not opened:
                self._done(endpoint)

    def _done(self, endpoint: str) -> None:
        self.active -= 1
        left = self._in_flight.get(endpoint, 1) - 1
        if left > 0:
            self._in_flight[endpoint] = left
        else:
            self._in_flight.pop(endpoint, None)

    async def relay(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        request_id: str,
        body: LimitedBody | None = None,
    ) -> web.StreamResponse:
        """Stream `upstream`'s answer to the client; always releases `upstream`.

        When the request body broke a limit while streaming, the upstream's answer (often
        an error about the cut-off body) is dropped and the limit is reported instead.
        """
        try:
            if body is not None and body.exceeded:
                raise PayloadTooLarge(f"request body over the {self._max_body}-byte limit")
            if body is not None and body.timed_out:
                raise RequestTimeout(f"no request body bytes for {self._body_timeout:g}s")
            return await self._relay(request, upstream, request_id)
        finally:
            upstream.release()
            self._done(_endpoint_of(upstream))

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, request_id: str
    ) -> web.StreamResponse:
        if _short_keepalive(upstream.headers, self._keepalive_timeout):
            # The peer closes idle connections sooner than our pool would reuse them: mark
            # this one to be closed, not pooled, when its body ends (aiohttp pools it at EOF).
            connection = upstream.connection
            if connection is not None and connection.protocol is not None:
                connection.protocol.force_close()
        codings = upstream.headers.getall("Transfer-Encoding", ())
        if codings and [t.strip().lower() for v in codings for t in v.split(",")] != ["chunked"]:
            # We cannot know where such a body ends (RFC 9112 section 6.3): refuse it.
            raise UpstreamProtocolError(f"the app answered with Transfer-Encoding {', '.join(codings)!r}")
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream.headers, request_id),
        )
        length = upstream.headers.get("Content-Length")
        if length is not None and length.isdigit():
            response.content_length = int(length)
        elif upstream.status not in (204, 304) and request.method != "HEAD":
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                async with asyncio.timeout(self._write_timeout):
                    await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: the only honest answer is a broken connection,
            # never a clean-looking truncated body.
            log.warning("upstream %s broke mid-response: %s", upstream.url.host, _reason(exc))
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


class ForwardError(Exception):
    """An attempt that failed before a response arrived: how (for retry decisions) and
    the SidecarError the caller should see if it is not retried."""

    def __init__(self, kind: AttemptFailure, error: SidecarError) -> None:
        super().__init__(error.message)
        self.kind = kind
        self.error = error


class LimitedBody:
    """Streams a request body upstream, counting it against the size limit."""

    __slots__ = ("_content", "_limit", "_timeout", "exceeded", "sent", "timed_out")

    def __init__(self, content: aiohttp.StreamReader, limit: int, timeout: float = 30.0) -> None:
        self._content = content
        self._limit = limit
        self._timeout = timeout
        self.sent = 0
        self.exceeded = False
        self.timed_out = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.timed_out = True
                raise RequestTimeout(f"no request body bytes for {self._timeout:g}s") from None
            if not chunk:
                return
            self.sent += len(chunk)
            if self.sent > self._limit:
                self.exceeded = True
                raise PayloadTooLarge(f"request body over the {self._limit}-byte limit")
            yield chunk


def _endpoint_of(upstream: aiohttp.ClientResponse) -> str:
    host = upstream.url.raw_host or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{upstream.url.port}"


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
