"""The server side of the inbound and outbound listeners: a lean HTTP/1.1 server on
asyncio protocols, parsing with llhttp (aiohttp's C parser), with the limits a proxy on
every request path needs. The request and response it hands around are in messages.py.

Rules of this file:
- a request head must arrive within `header_timeout` (408, then close), an idle
  keep-alive connection closes after `idle_timeout`, at most `max_connections` client
  connections are open per listener (503, then close, beyond that);
- requests on one connection are answered one at a time, in order (pipelining), by one
  task each; a connection is reused only when its request body was read to the end and
  neither side asked to close;
- a request the parser rejects is answered with the status that names the problem
  (414 request line too long, 431 header too large or too many, 505 bad version,
  400 otherwise), in the sidecar's own JSON error format, and the connection is closed;
- `check_request` adds what llhttp lets through but a proxy must not forward
  (Transfer-Encoding other than a single final `chunked`, CONNECT, HTTP/0.9 and 2+,
  fragments, a Host that is missing, repeated or malformed, an absolute-form target that
  disagrees with Host, an oversized header block);
- after an early answer (a refusal before the body was read, 408, a parse error) what the
  client still sends is read and dropped for a moment before the close, so that the
  client can read the answer;
- malformed client input is logged at debug level, one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions
from aiohttp._http_parser import HttpRequestParser
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError

from ..errors import (
    ERROR_HEADER,
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    NotImplementedTransferCoding,
    RequestTimeout,
    SidecarError,
    VersionNotSupported,
    error_body,
    error_response,
)
from .h2_core import PREFACE
from .h2_server import H2ServerConnection
from .headers import HOST_RE, only_chunked
from .messages import Request, Response, reason_phrase
from .tls import PeerCertificate, peer_certificate

log = logging.getLogger(__name__)

# The request line and a single header line get different limits so that the parser's
# LineTooLong error tells them apart (it names the limit, not the part).
MAX_REQUEST_LINE = 8192
MAX_FIELD = 8190
MAX_HEADERS = 100
MAX_HEADER_BLOCK = 32 * 1024
READ_BUFSIZE = 2**16
CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServerLimits:
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 10_000
    h2_max_streams: int = 1000


def check_request(request: Request) -> None:
    """Refuse what the parser accepted but a proxy must not pass on. Raises SidecarError."""
    version = request.version
    if version not in ((1, 0), (1, 1)):
        raise VersionNotSupported(f"HTTP/{version.major}.{version.minor} is not supported")
    if request.method == "CONNECT":
        raise MethodNotAllowed("CONNECT is not supported: the sidecar is not a tunnel")
    raw = request.raw_headers
    # the parser caps every line at MAX_FIELD: a few headers cannot reach the block limit
    size = (
        sum(len(name) + len(value) + 4 for name, value in raw)
        if len(raw) * (MAX_FIELD + 4) > MAX_HEADER_BLOCK
        else 0
    )
    if size > MAX_HEADER_BLOCK:
        raise HeadersTooLarge(f"the request headers are {size} bytes, over the {MAX_HEADER_BLOCK}-byte limit")
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings:
        if version == (1, 0):
            raise BadRequest("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if not only_chunked(codings):
            raise NotImplementedTransferCoding(
                f"Transfer-Encoding {', '.join(codings)!r} is not supported; only a single 'chunked'"
            )
    hosts = request.headers.getall("Host", ())
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    if version == (1, 1) and not hosts:
        raise BadRequest("an HTTP/1.1 request needs a Host header")
    if hosts and not HOST_RE.match(hosts[0]):
        raise BadRequest("the Host header is malformed")
    target = request.raw_path
    if "#" in target:
        raise BadRequest("a request target must not contain a fragment")
    if target.startswith(("http://", "https://")) and hosts:
        authority = target.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        if authority.lower() != hosts[0].lower():
            raise BadRequest("the Host header disagrees with the request target")
    elif not target.startswith(("/", "http://", "https://")) and not (
        target == "*" and request.method == "OPTIONS"
    ):
        raise BadRequest("the request target must be a path or an absolute URL")


def _parse_error_status(exc: BaseException | None) -> tuple[int, str, str]:
    """(status, error code, message) for a request the parser rejected."""
    text = str(getattr(exc, "message", "") or exc or "malformed request")
    if isinstance(exc, http_exceptions.LineTooLong):
        if f"more than {MAX_REQUEST_LINE} bytes" in text:
            return 414, "uri_too_long", "the request line is too long"
        return 431, "request_headers_too_large", "a request header is too long"
    if "Too many headers" in text:
        return 431, "request_headers_too_large", f"more than {MAX_HEADERS} request headers"
    if "HTTP version" in text:
        return 505, "http_version_not_supported", "unsupported HTTP version"
    first = " ".join(text.split())[:200]
    return 400, "bad_request", f"malformed request: {first}"


def _raw_error(err: SidecarError, sidecar: str) -> bytes:
    """The answer as bytes, for the moments when there is no request to answer."""
    body = error_body(err, sidecar)
    head = (
        f"HTTP/1.1 {err.status} {reason_phrase(err.status)}\r\n"
        f"{ERROR_HEADER}: {err.code}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


Handler = Callable[[Request], Awaitable[Response]]

# Requests parsed ahead of the one being answered (pipelining) before reading pauses.
MAX_PIPELINED = 16
# After an answer that ends the exchange early (413, 408, a parse error...), what the
# client still sends is read and dropped for this long, so that it can read the answer
# (closing with unread bytes would reset the connection under it), then it is closed.
LINGER = 0.3
# Seconds between the probes of a client that sent a FIN while its answer is awaited.
_PROBES = (0.05, 0.2, 1.0, 2.0)


class ClientConnection(BaseProtocol):
    """One client connection: llhttp parses, one task per request answers, in order."""

    __slots__ = (
        "_eof",
        "_fresh",
        "_head_timer",
        "_held",
        "_idle_since",
        "_lingering",
        "_queue",
        "_raw",
        "_request",
        "_server",
        "_task",
        "closing",
        "peer",
        "remote",
    )

    def __init__(self, server: Server) -> None:
        super().__init__(asyncio.get_running_loop())  # once per connection, not per request
        self._parser = self._make_parser()
        self._server = server
        self._queue: collections.deque[tuple[Any, StreamReader]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._request: Request | None = None
        self._eof = False  # the client half-closed: answer what it asked, then close
        self._head_timer: asyncio.TimerHandle | None = None
        # loop time since when the connection waits for a request (None: busy); the
        # listener's sweep closes it after idle_timeout, so no timer is made per request
        self._idle_since: float | None = None
        self._raw: StreamReader | None = None  # after a 101: the client's bytes, unparsed
        self._held = b""  # bytes after an upgrade request, until a tunnel takes them
        self._lingering = False
        self._fresh = False  # no byte received yet: HTTP/2 may start
        self.closing = False  # no request after the current one
        self.remote = ""
        self.peer: PeerCertificate | None = None  # a TLS client's verified certificate

    def _make_parser(self) -> HttpRequestParser:
        return HttpRequestParser(
            self,
            self._loop,
            READ_BUFSIZE,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            payload_exception=RequestPayloadError,
            auto_decompress=False,  # a proxy passes bodies on as they are
        )

    def __repr__(self) -> str:
        return f"<ClientConnection {self.remote} busy={self._task is not None} queued={len(self._queue)}>"

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if len(server.connections) >= server.limits.max_connections:
            server.refused += 1
            err = SidecarError(
                f"over {server.limits.max_connections} connections", status=503, code="too_many_connections"
            )
            transport.write(_raw_error(err, server.sidecar_name))  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.peer = peer_certificate(ssl_object)
            if ssl_object.selected_alpn_protocol() == "h2":
                self._to_http2(b"")
                return
        self._arm_idle()
        self._fresh = True

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        self.closing = True
        self._cancel_timers()
        self._queue.clear()
        if self._raw is not None:
            self._raw.feed_eof()
        parser = self._parser
        if parser is not None:
            self._parser = None
            try:
                parser.feed_eof()
            except Exception as err:  # a body cut short: its reader gets the error below
                log.debug("client %s left mid-request: %s", self.remote, err)
        request = self._request
        if request is not None and not request.content.is_eof():
            request.content.set_exception(ConnectionResetError("the client closed the connection"))
        task = self._task
        if task is not None and self._raw is None:
            # Nobody will read the answer: stop the work the request started (its
            # attempts, and through their reset connections the next hops' work too).
            task.cancel()

    def data_received(self, data: bytes) -> None:
        if self._fresh:
            # the first bytes: the HTTP/2 connection preface (prior knowledge) or HTTP/1.1
            self._fresh = False
            if data[:3] == b"PRI" and PREFACE.startswith(data[: len(PREFACE)]):
                self._to_http2(data)
                return
        if self._raw is not None:
            self._raw.feed_data(data)
            return
        if self._lingering or self.transport is None:
            return
        if self._upgraded:  # held for the tunnel, which takes them with take_over()
            self._held += data
            if len(self._held) > READ_BUFSIZE:
                self._pause_reading_for_buffer()
            return
        parser = self._parser
        assert parser is not None
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except http_exceptions.HttpProcessingError as exc:
            self._refuse(exc)
            return
        if upgraded:
            self._upgraded = True
            self._held = tail
        if messages:
            self._cancel_timers()
            self._queue.extend(messages)
            if len(self._queue) > MAX_PIPELINED:
                self._pause_reading_for_buffer()
            if self._task is None:
                self._next()
        elif self._head_timer is None and self._task is None and not self._queue and data:
            # Part of a request head: the head timer runs from its first byte to its end
            # (a head that arrives whole, the usual case, never needs one). An idle
            # connection (no byte yet) is the idle sweep's business instead.
            self._idle_since = None
            self._head_timer = self._loop.call_later(self._server.limits.header_timeout, self._head_timed_out)

    def eof_received(self) -> bool:
        if self._raw is not None:
            self._raw.feed_eof()
            return True  # the tunnel ends, then closes
        if self._request is None and not self._queue:
            return False  # idle: close
        # A client that half-closes after its request still gets the answer, then the close.
        self._eof = True
        request = self._request
        if request is not None and not request.content.is_eof():
            request.content.set_exception(ConnectionResetError("the client closed its side mid-body"))
        elif request is not None and request.version == (1, 1):
            self._probe(0)
        return True

    def _probe(self, n: int) -> None:
        """Tell a client that closed from one that half-closed, while its answer is awaited.

        Both send a FIN; only a write tells them apart: to a closed socket the client's
        host answers with a reset, and the write after that fails, which ends the
        connection (and cancels the request, see connection_lost). An HTTP/1.1 client must
        accept interim answers it did not ask for (RFC 9110 section 15.2), so the probes
        are `100 Continue`s, a few at first (the reset takes a round trip), then one every
        couple of seconds until the answer starts.
        """
        request, transport = self._request, self.transport
        if request is None or request.head_sent or transport is None or transport.is_closing():
            return
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._loop.call_later(_PROBES[min(n, len(_PROBES) - 1)], self._probe, n + 1)

    def _to_http2(self, data: bytes) -> None:
        """Hand the transport to the HTTP/2 side, with the bytes read so far."""
        transport = self.transport
        assert transport is not None
        self._cancel_timers()
        self._server.connections.discard(self)
        self._parser = None
        self.transport = None
        h2 = H2ServerConnection(self._server, self.remote, self.peer)
        transport.set_protocol(h2)
        h2.connection_made(transport)
        if data:
            h2.data_received(data)

    # -- requests --------------------------------------------------------------------------

    def _next(self) -> None:
        if not self._queue or self.closing or self.transport is None:
            return
        message, payload = self._queue.popleft()
        if self._buffer_paused and len(self._queue) <= MAX_PIPELINED // 2 and not self._upgraded:
            self._resume_reading_for_buffer()
        request = self._request = Request(self, message, payload)
        if message.upgrade and request.headers.get("Upgrade", "").lower() != "websocket":
            # An upgrade we never make (h2c, say): the parser keeps no bytes after such a
            # request, so a request pipelined behind it would be lost; closing after the
            # answer tells the client to send it again.
            request.close = True
        self._task = self._loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        server = self._server
        try:
            try:
                check_request(request)
                response = await server.handler(request)
            except SidecarError as err:
                log.debug("refused a request from %s: %s", self.remote, err.message)
                response = error_response(err, server.sidecar_name, None)
            if not request.head_sent:
                request.send(response)
        except asyncio.CancelledError:
            self._task = self._request = None  # the client left (connection_lost)
            raise
        except ConnectionError as exc:
            log.debug("client %s left before its answer was sent: %s", self.remote, exc)
            self._task = self._request = None
            self.abort()
            return
        except Exception as exc:
            self._task = self._request = None
            log.error("error handling a request from %s: %r", self.remote, exc)
            if request.head_sent or self.transport is None:
                self.abort()
                return
            failed = SidecarError(
                "the sidecar failed to handle the request", status=500, code="internal_error"
            )
            self._answer_and_close(failed)
            return
        self._task = self._request = None
        self._finished(request)

    def _finished(self, request: Request) -> None:
        """After an answer: the next request, or the close the exchange calls for."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        held = b""
        if self._upgraded:
            if self._raw is not None:  # a tunnel ended
                self.closing = True
                transport.close()
                return
            # The app refused the upgrade: the connection is still HTTP, and what the
            # client sent after the request is its next request.
            held, self._held = self._held, b""
            self._upgraded = False
            self._parser = self._make_parser()
            if self._buffer_paused:
                self._resume_reading_for_buffer()
        if request.close or self.closing:
            self.closing = True
            if request.content.is_eof():
                transport.close()
            else:
                self._linger()
            return
        if not request.content.is_eof():
            # the answer went out before the body was read (an early refusal): the rest
            # of the body cannot be told apart from a next request
            self.closing = True
            self._linger()
            return
        if held:
            self.data_received(held)
            if self._task is not None or self.closing:
                return
        if self._queue:
            self._next()
        elif self._eof:
            self.closing = True
            transport.close()
        else:
            self._arm_idle()

    # -- ends of connections ----------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._server.draining

    def client_gone(self) -> bool:
        transport = self.transport
        return transport is None or transport.is_closing()

    async def drain(self) -> None:
        await self._drain_helper()

    def take_over(self) -> StreamReader:
        """Switch to raw bytes after a 101: everything the client sends goes to the reader."""
        reader = StreamReader(self, CHUNK, loop=self._loop)
        self._cancel_timers()
        held, self._held = self._held, b""
        if held:
            reader.feed_data(held)
        self._raw = reader
        if self._buffer_paused:
            self._resume_reading_for_buffer()
        if self.transport is None:
            reader.feed_eof()
        return reader

    @property
    def busy(self) -> bool:
        """Answering a request, or carrying a tunnel."""
        return self._task is not None or self._raw is not None

    def force_close(self) -> None:
        """The grace period is over: drop the connection and the answer under way on it."""
        task = self._task
        self.abort()
        if task is not None:
            task.cancel()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """The listener is stopping: close now when idle, else after the current answer."""
        self.closing = True
        if self._task is None and self.transport is not None and self._raw is None:
            self.transport.close()

    def _refuse(self, exc: BaseException) -> None:
        status, code, text = _parse_error_status(exc)
        log.debug("refused a malformed request from %s: %s", self.remote, text)
        self._answer_and_close(SidecarError(text, status=status, code=code))

    def _answer_and_close(self, err: SidecarError) -> None:
        self.closing = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.write(_raw_error(err, self._server.sidecar_name))
            self._linger()

    def _linger(self) -> None:
        self._lingering = True
        self._parser = None
        if self._buffer_paused:
            self._resume_reading_for_buffer()
        transport = self.transport
        if transport is not None:
            self._loop.call_later(LINGER, transport.close)

    # -- timers ---------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._task is not None or self._queue:
            return
        timeout = self._server.limits.header_timeout
        self._answer_and_close(RequestTimeout(f"no complete request head within {timeout:g}s"))

    def _arm_idle(self) -> None:
        self._idle_since = self._loop.time()

    def idle_expired(self, now: float, timeout: float) -> bool:
        """Close the connection when it waited longer than `timeout` for a request."""
        since = self._idle_since
        if since is None or now - since < timeout:
            return False
        if self.transport is not None and self._task is None and not self._queue and self._raw is None:
            self.closing = True
            self.transport.close()
        return True

    def _cancel_timers(self) -> None:
        self._idle_since = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class Server:
    """The connections of one listener and what they share."""

    def __init__(self, handler: Handler, *, limits: ServerLimits, sidecar_name: str) -> None:
        self.handler = handler
        self.limits = limits
        self.sidecar_name = sidecar_name
        self.connections: set[ClientConnection | H2ServerConnection] = set()
        self.refused = 0
        self.tls_failures = 0  # connections dropped before HTTP: failed TLS handshakes, silence
        self.draining = False  # answers say Connection: close (the sidecar is stopping)
        self._sweep_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Close idle keep-alive connections from now on (one sweep for all of them)."""
        self._sweep()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.idle_timeout
        now = loop.time()
        for conn in list(self.connections):
            conn.idle_expired(now, timeout)
        # closed at most a quarter of the timeout late (and at most a second)
        self._sweep_handle = loop.call_later(min(1.0, timeout / 4), self._sweep)

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def busy(self) -> int:
        return sum(1 for conn in self.connections if conn.busy)

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now, let answers in progress finish for `grace` seconds,
        then abort what is left."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for conn in list(self.connections):
            conn.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.busy() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.force_close()
