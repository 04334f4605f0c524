"""The server side of the inbound and outbound listeners: aiohttp's HTTP/1.1 server (its
C parser, llhttp) with the limits a proxy on every request path needs.

Rules of this file:
- a request head must arrive within `header_timeout` (408, then close), an idle
  keep-alive connection closes after `idle_timeout`, at most `max_connections` client
  connections are open per listener (503, then close, beyond that);
- a request the parser rejects is answered with the status that names the problem
  (414 request line too long, 431 header too large or too many, 505 bad version,
  400 otherwise), in the sidecar's own JSON error format, and the connection is closed;
- `check_request` adds what llhttp lets through but a proxy must not forward
  (Transfer-Encoding other than a single final `chunked`, CONNECT, HTTP/0.9 and 2+,
  fragments, a Host that is missing, repeated or malformed, an absolute-form target that
  disagrees with Host, an oversized header block);
- malformed client input is logged at debug level, one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from .errors import (
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
from .forward import only_chunked

log = logging.getLogger(__name__)

# The request line and a single header line get different limits so that the parser's
# LineTooLong error tells them apart (it names the limit, not the part).
MAX_REQUEST_LINE = 8192
MAX_FIELD = 8190
MAX_HEADERS = 100
MAX_HEADER_BLOCK = 32 * 1024

_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{1,5})?$")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 10_000


def check_request(request: web.BaseRequest) -> None:
    """Refuse what the parser accepted but a proxy must not pass on. Raises SidecarError."""
    version = request.version
    if version not in ((1, 0), (1, 1)):
        raise VersionNotSupported(f"HTTP/{version.major}.{version.minor} is not supported")
    if request.method == "CONNECT":
        raise MethodNotAllowed("CONNECT is not supported: the sidecar is not a tunnel")
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
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
    if hosts and not _HOST_RE.match(hosts[0]):
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


def _raw_error(err: SidecarError, reason: str, sidecar: str) -> bytes:
    """The answer as bytes, for the moments before aiohttp has a request to answer."""
    body = error_body(err, sidecar)
    head = (
        f"HTTP/1.1 {err.status} {reason}\r\n"
        f"{ERROR_HEADER}: {err.code}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class SidecarRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with the limits described above."""

    def __init__(self, manager: SidecarServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._sidecar_server = manager
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._sidecar_server
        if server.open_connections >= server.limits.max_connections:
            server.refused += 1
            message = f"over {server.limits.max_connections} connections"
            transport.write(  # type: ignore[attr-defined]
                _raw_error(
                    SidecarError(message, status=503, code="too_many_connections"),
                    "Service Unavailable",
                    server.sidecar_name,
                )
            )
            transport.close()
            return
        server.open_connections += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if getattr(self, "_counted", False):
            self._sidecar_server.open_connections -= 1
            self._counted = False
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The head timer runs from the first byte of a request to the end of its head; an
        # idle connection (no byte yet) is the keep-alive timer's business instead.
        if self._head_timer is None and self._current_request is None and not self._upgraded:
            self._start_head_timer()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._cancel_head_timer()

    def _process_keepalive(self) -> None:
        if self._head_timer is not None:
            return  # a request head is on its way: the head timer decides (408)
        super()._process_keepalive()

    def _start_head_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._sidecar_server.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._current_request is not None or self._messages:
            return
        timeout = self._sidecar_server.limits.header_timeout
        self.transport.write(
            _raw_error(
                RequestTimeout(f"no complete request head within {timeout:g}s"),
                "Request Timeout",
                self._sidecar_server.sidecar_name,
            )
        )
        self.force_close()  # closes the transport after the 408 is written

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if status == 400 or isinstance(exc, http_exceptions.HttpProcessingError):
            status, code, text = _parse_error_status(exc)
            log.debug("refused a malformed request from %s: %s", request.remote, text)
        else:
            code, text = "internal_error", "the sidecar failed to handle the request"
            log.error("error handling a request from %s: %r", request.remote, exc)
        err = SidecarError(text, status=status, code=code)
        response = error_response(err, self._sidecar_server.sidecar_name)
        response.force_close()
        return response


class SidecarServer(web.Server):
    """aiohttp's low-level server with SidecarRequestHandler connections."""

    def __init__(self, handler: Any, *, limits: ServerLimits, sidecar_name: str, **kwargs: Any) -> None:
        super().__init__(
            handler,
            keepalive_timeout=limits.idle_timeout,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            # After an answer that ends the exchange early (413, 408...) read and drop
            # what the client still sends for a moment, so it can read our answer, then close.
            lingering_time=0.3,
            **kwargs,
        )
        self.limits = limits
        self.sidecar_name = sidecar_name
        self.open_connections = 0
        self.refused = 0

    def __call__(self) -> SidecarRequestHandler:
        return SidecarRequestHandler(self, loop=self._loop, **self._kwargs)


def guarded(handler: Any, sidecar_name: str) -> Any:
    """Wrap a request handler with `check_request`, answering refusals in the sidecar's format."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            check_request(request)
        except SidecarError as err:
            log.debug("refused a request from %s: %s", request.remote, err.message)
            return error_response(err, sidecar_name, None)
        response: web.StreamResponse = await handler(request)
        return response

    return handle


# Connections taken from the accept queue per readiness event. libuv (under uvloop)
# accepts one per event-loop iteration, so a saturated loop drained a full listen queue at
# a few dozen connections per second and new clients starved; we accept in a loop instead.
ACCEPT_BATCH = 1024


class FairTCPSite(web.TCPSite):
    """aiohttp's TCPSite, but the listening sockets are ours and every readiness event
    accepts up to ACCEPT_BATCH waiting connections, each handed to the loop with
    `connect_accepted_socket`."""

    __slots__ = ("_attaching", "_listening")

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        sockets = await _bind(loop, self._host, self._port, self._backlog, bool(self._reuse_port))
        self._listening = sockets
        self._attaching: set[asyncio.Task[Any]] = set()
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._server = _AcceptServer(loop, sockets)
        self._bound_port = sockets[0].getsockname()[1]

    def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        factory = self._runner.server
        if factory is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors or memory: stop accepting for a moment instead
                    # of spinning on a listen socket that stays readable
                    log.warning("cannot accept connections: %s; pausing for 0.5s", exc)
                    loop.remove_reader(sock.fileno())
                    loop.call_later(0.5, self._resume, sock)
                return
            conn.setblocking(False)
            task = loop.create_task(_attach(loop, factory, conn))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() != -1:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)


async def _attach(loop: asyncio.AbstractEventLoop, factory: Any, conn: socket.socket) -> None:
    try:
        await loop.connect_accepted_socket(factory, conn)
    except OSError as exc:
        log.debug("dropped an accepted connection: %s", exc)
        conn.close()


async def _bind(
    loop: asyncio.AbstractEventLoop, host: str | None, port: int, backlog: int, reuse_port: bool = False
) -> list[socket.socket]:
    """Listening sockets for `host`:`port`, as loop.create_server would make them."""
    infos = await loop.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _canon, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # --workers: several processes share this port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _AcceptServer(asyncio.AbstractServer):
    """What BaseSite.stop() and BaseRunner.addresses need of a server: close and sockets."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket]) -> None:
        self._loop = loop
        self.sockets = sockets

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(sock.fileno() != -1 for sock in self.sockets)

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        return None


class Listener:
    """One listening socket and its server; `port` is the port it got (for port 0)."""

    def __init__(
        self,
        name: str,
        handler: Any,
        host: str,
        port: int,
        grace: float,
        *,
        limits: ServerLimits | None = None,
        sidecar_name: str = "micro-sidecar",
        reuse_port: bool = False,
    ) -> None:
        self.name = name
        self.reuse_port = reuse_port
        self.host = host
        self.requested_port = port
        self.server: SidecarServer | None = None
        if isinstance(handler, web.Application):  # the admin listener: plain aiohttp
            self.runner: web.BaseRunner = web.AppRunner(
                handler, handle_signals=False, access_log=None, shutdown_timeout=grace
            )
        else:
            self.server = SidecarServer(
                guarded(handler, sidecar_name),
                limits=limits or ServerLimits(),
                sidecar_name=sidecar_name,
                access_log=None,
                # A proxy passes bodies through as they are, compressed or not.
                auto_decompress=False,
            )
            self.runner = web.ServerRunner(self.server, handle_signals=False, shutdown_timeout=grace)
        self.port = 0

    def __repr__(self) -> str:
        connections = self.server.open_connections if self.server else "?"
        return f"<Listener {self.name} {self.host}:{self.port} connections={connections}>"

    async def start(self) -> None:
        await self.runner.setup()
        site: web.TCPSite
        if self.server is not None:
            site = FairTCPSite(
                self.runner, self.host, self.requested_port, backlog=1024, reuse_port=self.reuse_port or None
            )
        else:
            site = web.TCPSite(self.runner, self.host, self.requested_port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            raise OSError(
                exc.errno,
                f"{self.name} listener cannot bind {self.host}:{self.requested_port}: {exc.strerror}",
            ) from exc
        self.port = site.port

    async def stop(self) -> None:
        await self.runner.cleanup()
