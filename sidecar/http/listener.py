"""Listening sockets: binding, accepting in batches, and the listener's life (start, and
stop with a grace period for answers in progress). What a connection speaks is
server.py's business; the admin listener is plain aiohttp.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

from aiohttp import web

from .server import Handler, Server, ServerLimits
from .tls import TLS_HANDSHAKE, ServerTLS

log = logging.getLogger(__name__)

# Connections taken from the accept queue per readiness event. libuv (under uvloop)
# accepts one per event-loop iteration, so a saturated loop drained a full listen queue at
# a few dozen connections per second and new clients starved; we accept in a loop instead.
ACCEPT_BATCH = 1024


class Acceptor:
    """Listening sockets whose every readiness event accepts up to ACCEPT_BATCH waiting
    connections, each handed to the loop with `connect_accepted_socket`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        server: Server,
        tls: ServerTLS | None = None,
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._server = server
        self._tls = tls
        self._attaching: set[asyncio.Task[Any]] = set()
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        loop = self._loop
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
            if self._tls is None:
                task = loop.create_task(_attach(loop, self._server, conn))
            else:
                task = loop.create_task(_attach_sniffed(loop, self._server, conn, self._tls))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() != -1:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()


async def _attach(loop: asyncio.AbstractEventLoop, server: Server, conn: socket.socket) -> None:
    try:
        await loop.connect_accepted_socket(server, conn)
    except OSError as exc:
        log.debug("dropped an accepted connection: %s", exc)
        conn.close()


async def _attach_sniffed(
    loop: asyncio.AbstractEventLoop, server: Server, conn: socket.socket, tls: ServerTLS
) -> None:
    """TLS and plaintext on one port: peek at the first byte the client sends (a TLS
    ClientHello starts with 0x16, an HTTP/1.1 request with a letter) before the socket
    becomes a transport. (Server-side start_tls after the fact loses the ClientHello on
    uvloop.) A client that sends nothing within the header timeout is closed."""
    timeout = server.limits.header_timeout
    try:
        async with asyncio.timeout(timeout):
            first = await _peek(loop, conn)
        if not first:
            conn.close()
            return
        if first[0] != TLS_HANDSHAKE:
            await loop.connect_accepted_socket(server, conn)
            return
        context = tls.server_context()
        if context is None:  # no valid certificate to answer with: refuse the handshake
            server.tls_failures += 1
            conn.close()
            return
        await loop.connect_accepted_socket(server, conn, ssl=context, ssl_handshake_timeout=timeout)
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        server.tls_failures += 1
        log.debug("dropped an accepted connection before HTTP: %s", exc)
        conn.close()


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The first byte waiting on `conn`, left in place; b"" when the client closed."""
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


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


class Listener:
    """One listening socket and its server; `port` is the port it got (for port 0)."""

    def __init__(
        self,
        name: str,
        handler: Handler | web.Application,
        host: str,
        port: int,
        grace: float,
        *,
        limits: ServerLimits | None = None,
        sidecar_name: str = "micro-sidecar",
        reuse_port: bool = False,
        tls: ServerTLS | None = None,
    ) -> None:
        self.name = name
        self.tls = tls  # set: TLS and plaintext on the same port
        self.reuse_port = reuse_port
        self.host = host
        self.requested_port = port
        self.grace = grace
        self.server: Server | None = None
        self._acceptor: Acceptor | None = None
        self._runner: web.AppRunner | None = None
        if isinstance(handler, web.Application):  # the admin listener: plain aiohttp
            self._runner = web.AppRunner(
                handler, handle_signals=False, access_log=None, shutdown_timeout=grace
            )
        else:
            self.server = Server(handler, limits=limits or ServerLimits(), sidecar_name=sidecar_name)
        self.port = 0

    def __repr__(self) -> str:
        connections = self.server.open_connections if self.server else "?"
        return f"<Listener {self.name} {self.host}:{self.port} connections={connections}>"

    async def start(self) -> None:
        try:
            if self.server is None:
                assert self._runner is not None
                await self._runner.setup()
                site = web.TCPSite(self._runner, self.host, self.requested_port, backlog=1024)
                await site.start()
                self.port = self._runner.addresses[0][1]
                return
            loop = asyncio.get_running_loop()
            sockets = await _bind(loop, self.host, self.requested_port, 1024, self.reuse_port)
        except OSError as exc:
            if self._runner is not None:
                await self._runner.cleanup()
            raise OSError(
                exc.errno,
                f"{self.name} listener cannot bind {self.host}:{self.requested_port}: {exc.strerror}",
            ) from exc
        self.server.start()
        self._acceptor = Acceptor(loop, sockets, self.server, self.tls)
        self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let answers in progress finish within the grace period."""
        if self._runner is not None:
            await self._runner.cleanup()
            return
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        if self.server is not None:
            await self.server.shutdown(self.grace)
