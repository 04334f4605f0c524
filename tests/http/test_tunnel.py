"""WebSocket tunnelling (sidecar/http/tunnel.py) over real loopback sockets.

A real aiohttp WebSocket app, one or two of the sidecar's listeners with a tunnelling
handler in front of it (like outbound sidecar -> inbound sidecar -> app), and real
clients: aiohttp's ws_connect and raw sockets for what must (not) be on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from sidecar.errors import SidecarError, error_response
from sidecar.http.headers import request_headers
from sidecar.http.listener import Listener
from sidecar.http.messages import Request, Response
from sidecar.http.server import ServerLimits
from sidecar.http.tunnel import is_upgrade, tunnel

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass
class EchoApp:
    """The app behind the tunnel; remembers what it saw."""

    port: int = 0
    seen_headers: list[CIMultiDict[str]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen_headers.append(CIMultiDict(request.headers))
        if request.path == "/forbidden":
            return web.Response(status=403, text="go away", headers={"X-App": "yes"})
        if request.path == "/forbidden-chunked":
            response = web.StreamResponse(status=403, headers={"X-App": "chunked"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"not ", b"for ", b"you"):
                await response.write(part)
            await response.write_eof()
            return response
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    if msg.data == "bye":
                        await ws.close(code=4001, message=b"app says bye")
                    else:
                        await ws.send_str("echo:" + msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self.closed.set()
        return ws


async def serve(handler: Handler) -> tuple[web.ServerRunner, int]:
    runner = web.ServerRunner(web.Server(handler, auto_decompress=False), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def tunnelling(
    target_port: int, idle_timeout: float = 5.0, response_timeout: float = 2.0
) -> Callable[[Request], Awaitable[Response]]:
    """A handler shaped like the sidecar's: upgrades go through tunnel(), errors are SidecarErrors."""

    async def handle(request: Request) -> Response:
        headers, request_id = request_headers(request, None)
        if not is_upgrade(request):
            body = f"plain {request.raw_path}".encode()
            return Response(200, [("X-Request-Id", request_id), ("Content-Type", "text/plain")], body)
        try:
            return await tunnel(
                request,
                f"127.0.0.1:{target_port}",
                request.raw_path,
                headers,
                request_id,
                connect_timeout=1.0,
                response_timeout=response_timeout,
                idle_timeout=idle_timeout,
            )
        except SidecarError as err:
            return error_response(err, "tunnel-test", request_id)

    return handle


@contextlib.asynccontextmanager
async def tunnel_server(target_port: int, **timeouts: float) -> AsyncIterator[int]:
    listener = Listener("tunnel", tunnelling(target_port, **timeouts), "127.0.0.1", 0, 0.5)
    await listener.start()
    try:
        yield listener.port
    finally:
        await listener.stop()
    assert_no_tunnel_tasks()


def assert_no_tunnel_tasks() -> None:
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("tunnel ")]


@pytest.fixture
async def app() -> AsyncIterator[EchoApp]:
    echo = EchoApp()
    runner, echo.port = await serve(echo.handle)
    yield echo
    await runner.cleanup()


@pytest.fixture
async def proxy(app: EchoApp) -> AsyncIterator[int]:
    async with tunnel_server(app.port) as port:
        yield port


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes | None) -> AsyncIterator[int]:
    """An 'app' that reads a request head and sends `answer` verbatim, then closes (None: hangs)."""
    handlers: set[asyncio.Task[None]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            if answer is None:
                await asyncio.sleep(30)
            writer.write(answer or b"")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def handshake(path: str = "/ws", key: str | None = None, extra: str = "") -> tuple[bytes, str]:
    key = key or base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: tunnel.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    return head.encode(), key


def masked_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 65536:
        length = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def head_fields(head: bytes) -> tuple[str, CIMultiDict[str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields.add(name, value.strip())
    return lines[0], fields


@contextlib.asynccontextmanager
async def handshake_answer(proxy: int) -> AsyncIterator[tuple[asyncio.StreamReader, str, CIMultiDict[str]]]:
    """A raw client's WebSocket handshake to `proxy`: the reader, status line and headers
    of the answer; the connection is closed on the way out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    try:
        writer.write(handshake()[0])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, fields = head_fields(head)
        yield reader, status, fields
    finally:
        writer.close()


# -- is_upgrade ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "version", "headers", "expected"),
    [
        ("GET", (1, 1), {"Connection": "Upgrade", "Upgrade": "websocket"}, True),
        ("GET", (1, 1), {"Connection": "keep-alive, UPGRADE", "Upgrade": "WebSocket"}, True),
        ("GET", (1, 1), {"Connection": "Upgrade", "Upgrade": "h2c"}, False),
        ("GET", (1, 1), {"Connection": "keep-alive", "Upgrade": "websocket"}, False),
        ("GET", (1, 1), {"Upgrade": "websocket"}, False),
        ("GET", (1, 1), {"Connection": "Upgrade"}, False),
        ("POST", (1, 1), {"Connection": "Upgrade", "Upgrade": "websocket"}, False),
        ("GET", (1, 0), {"Connection": "Upgrade", "Upgrade": "websocket"}, False),
    ],
)
def test_is_upgrade(method: str, version: tuple[int, int], headers: dict[str, str], expected: bool) -> None:
    request = make_mocked_request(method, "/ws", headers=headers, version=aiohttp.HttpVersion(*version))
    assert is_upgrade(request) is expected


# -- through one tunnel ---------------------------------------------------------------------


async def test_messages_echo_both_ways(app: EchoApp, proxy: int) -> None:
    big = os.urandom(1024 * 1024)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{proxy}/ws", protocols=("chat", "other"), compress=15) as ws,
    ):
        # ws_connect validated Sec-WebSocket-Accept; protocol and compression were negotiated
        # with the app through the tunnel.
        assert ws.protocol == "chat"
        assert ws.compress == 15
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "echo:hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01\xff"
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=5) == big
        await ws.close()
        assert ws.close_code == aiohttp.WSCloseCode.OK
    await asyncio.wait_for(app.closed.wait(), 5)
    seen = app.seen_headers[-1]
    assert seen["Upgrade"] == "websocket"
    assert "upgrade" in seen["Connection"].lower()
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["Host"] == f"127.0.0.1:{proxy}"


async def test_app_initiated_close(app: EchoApp, proxy: int) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{proxy}/ws") as ws:
        await ws.send_str("bye")
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
        assert msg.extra == "app says bye"
        await ws.close()
        assert ws.close_code == 4001
    await asyncio.wait_for(app.closed.wait(), 5)


async def test_wire_101_has_no_body_framing_and_bytes_are_not_chunked(app: EchoApp, proxy: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    try:
        head_bytes, key = handshake(extra="X-Request-Id: rid-42\r\n")
        writer.write(head_bytes)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, fields = head_fields(head)
        assert status == "HTTP/1.1 101 Switching Protocols"
        assert "Transfer-Encoding" not in fields
        assert "Content-Length" not in fields
        assert fields["Upgrade"].lower() == "websocket"
        assert fields["Connection"].lower() == "upgrade"
        assert fields["X-Request-Id"] == "rid-42"
        expected = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        assert fields["Sec-WebSocket-Accept"] == expected

        writer.write(masked_frame(0x1, b"abc"))
        assert await asyncio.wait_for(reader.readexactly(10), 5) == b"\x81\x08echo:abc"
        payload = os.urandom(70_000)
        writer.write(masked_frame(0x2, payload))
        echoed = await asyncio.wait_for(reader.readexactly(10 + len(payload)), 5)
        assert echoed == b"\x82\x7f" + len(payload).to_bytes(8, "big") + payload
        # Close handshake; afterwards the connection ends with nothing else on it
        # (no chunked terminator, no second response).
        writer.write(masked_frame(0x8, (1000).to_bytes(2, "big")))
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest == b"\x88\x02\x03\xe8"
    finally:
        writer.close()


async def test_hop_by_hop_headers_of_the_101_are_dropped() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\nSec-WebSocket-Accept: abc=\r\n"
        b"X-End: kept\r\n\r\n\x81\x02hi"
    )
    async with raw_upstream(answer) as port, tunnel_server(port) as proxy:
        async with handshake_answer(proxy) as (reader, status, fields):
            assert status == "HTTP/1.1 101 Switching Protocols"
            for gone in ("X-Hop", "Keep-Alive", "Content-Length", "Transfer-Encoding"):
                assert gone not in fields
            assert fields["Upgrade"] == "WebSocket"
            assert fields["Connection"] == "Upgrade"
            assert fields["Sec-WebSocket-Accept"] == "abc="
            assert fields["X-End"] == "kept"
            # bytes the app sent right behind its head arrive, then the app's close ends it all
            assert await asyncio.wait_for(reader.read(), 5) == b"\x81\x02hi"


async def test_client_bytes_sent_with_the_handshake_are_kept(app: EchoApp, proxy: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    try:
        head_bytes, _ = handshake()
        writer.write(head_bytes + masked_frame(0x1, b"early"))  # one segment: head and a frame
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"\x81\x0aecho:early"
    finally:
        writer.close()


async def test_client_vanishing_closes_the_app_side(app: EchoApp, proxy: int) -> None:
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(f"http://127.0.0.1:{proxy}/ws")
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "echo:x"
    finally:
        await session.close()  # drops the connection without a close handshake
    await asyncio.wait_for(app.closed.wait(), 5)


# -- anything but 101 -----------------------------------------------------------------------


async def test_non_101_is_relayed_with_its_body(app: EchoApp, proxy: int) -> None:
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    headers["Sec-WebSocket-Key"] = base64.b64encode(os.urandom(16)).decode()
    async with aiohttp.ClientSession() as session:
        for path, body, marker in (
            ("/forbidden", b"go away", "yes"),
            ("/forbidden-chunked", b"not for you", "chunked"),
        ):
            async with session.get(f"http://127.0.0.1:{proxy}{path}", headers=headers) as resp:
                assert resp.status == 403
                assert await resp.read() == body
                assert resp.headers["X-App"] == marker
                assert "X-Request-Id" in resp.headers
                assert "X-Sidecar-Error" not in resp.headers


async def test_declined_upgrade_keeps_the_client_connection_usable(app: EchoApp, proxy: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    try:
        head_bytes, _ = handshake("/forbidden")
        writer.write(head_bytes)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, fields = head_fields(head)
        assert status.startswith("HTTP/1.1 403")
        assert await reader.readexactly(int(fields["Content-Length"])) == b"go away"
        writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, fields = head_fields(head)
        assert status == "HTTP/1.1 200 OK"
        assert await reader.readexactly(int(fields["Content-Length"])) == b"plain /next"
    finally:
        writer.close()


async def test_body_until_close_is_reframed() -> None:
    answer = b"HTTP/1.1 400 Bad Request\r\nX-App: eof\r\n\r\nno such socket"
    async with raw_upstream(answer) as port, tunnel_server(port) as proxy:
        async with handshake_answer(proxy) as (reader, status, fields):
            assert status.startswith("HTTP/1.1 400")
            assert fields["Transfer-Encoding"] == "chunked"
            assert fields["X-App"] == "eof"
            body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
            assert body == b"e\r\nno such socket\r\n0\r\n\r\n"


async def test_truncated_answer_breaks_the_client_connection() -> None:
    answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nshort"
    async with raw_upstream(answer) as port, tunnel_server(port) as proxy:
        async with handshake_answer(proxy) as (reader, status, fields):
            assert status.startswith("HTTP/1.1 403")
            assert fields["Content-Length"] == "100"
            with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                await asyncio.wait_for(reader.readexactly(100), 5)


# -- failures before anything reached the client ---------------------------------------------


async def _error_of(proxy: int) -> tuple[int, dict[str, object]]:
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    headers["Sec-WebSocket-Key"] = base64.b64encode(os.urandom(16)).decode()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{proxy}/ws", headers=headers) as resp,
    ):
        assert resp.headers.get("X-Sidecar-Error")
        return resp.status, json.loads(await resp.read())


async def test_refused_connection_is_502() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with tunnel_server(port) as proxy:
        status, body = await _error_of(proxy)
    assert status == 502
    assert body["error"] == "upstream_connect_failed"
    assert body["sidecar"] == "tunnel-test"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 banana\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n folded: no\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 101 Switching",  # closed mid-head
        b"",  # closed without answering
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ],
)
async def test_malformed_answer_is_502(answer: bytes) -> None:
    async with raw_upstream(answer) as port, tunnel_server(port) as proxy:
        status, body = await _error_of(proxy)
    assert status == 502
    assert body["error"] == "upstream_bad_response"


async def test_silent_app_is_504() -> None:
    async with raw_upstream(None) as port, tunnel_server(port, response_timeout=0.3) as proxy:
        started = time.monotonic()
        status, body = await _error_of(proxy)
        assert time.monotonic() - started < 3
    assert status == 504
    assert body["error"] == "upstream_timeout"


# -- idle timeout, shutdown, chaining ---------------------------------------------------------


async def test_idle_tunnel_is_closed(app: EchoApp) -> None:
    async with (
        tunnel_server(app.port, idle_timeout=0.4) as proxy,
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{proxy}/ws", autoping=False) as ws,
    ):
        # Traffic keeps it open past the timeout...
        for _ in range(4):
            await ws.send_str("tick")
            assert await ws.receive_str(timeout=5) == "echo:tick"
            await asyncio.sleep(0.15)
        # ...silence closes it, on both sides.
        started = time.monotonic()
        msg = await ws.receive(timeout=5)
        waited = time.monotonic() - started
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR)
        assert 0.2 < waited < 3
        await asyncio.wait_for(app.closed.wait(), 5)


async def test_server_shutdown_ends_open_tunnels(app: EchoApp) -> None:
    listener = Listener("tunnel", tunnelling(app.port), "127.0.0.1", 0, 0.5)
    await listener.start()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{listener.port}/ws") as ws,
    ):
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "echo:x"
        started = time.monotonic()
        await listener.stop()
        assert time.monotonic() - started < 3
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR)
    await asyncio.wait_for(app.closed.wait(), 5)
    assert_no_tunnel_tasks()


async def test_two_chained_tunnels(app: EchoApp) -> None:
    """Like outbound sidecar -> inbound sidecar -> app."""
    big = os.urandom(1024 * 1024)
    async with tunnel_server(app.port) as inbound, tunnel_server(inbound) as outbound:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"http://127.0.0.1:{outbound}/ws", protocols=("chat",), headers={"X-Request-Id": "chain-1"}
            ) as ws,
        ):
            assert ws.protocol == "chat"
            await ws.send_str("through two")
            assert await ws.receive_str(timeout=5) == "echo:through two"
            await ws.send_bytes(big)
            assert await ws.receive_bytes(timeout=5) == big
            await ws.close()
            assert ws.close_code == aiohttp.WSCloseCode.OK
        await asyncio.wait_for(app.closed.wait(), 5)
    seen = app.seen_headers[-1]
    assert seen["X-Forwarded-For"] == "127.0.0.1, 127.0.0.1"
    assert seen["X-Request-Id"] == "chain-1"
    assert seen["Upgrade"] == "websocket"


async def test_through_the_sidecars_own_listeners(app: EchoApp) -> None:
    """The hand-over also works behind sidecar.http.server's hardened protocol (head timer, limits)."""
    limits = ServerLimits(header_timeout=0.3, idle_timeout=0.3)
    inbound = Listener("inbound", tunnelling(app.port), "127.0.0.1", 0, 0.5, limits=limits)
    await inbound.start()
    outbound = Listener("outbound", tunnelling(inbound.port), "127.0.0.1", 0, 0.5, limits=limits)
    await outbound.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{outbound.port}/ws") as ws,
        ):
            await ws.send_str("one")
            assert await ws.receive_str(timeout=5) == "echo:one"
            await asyncio.sleep(0.6)  # longer than the head and keep-alive timers: still open
            await ws.send_bytes(b"two" * 100_000)
            assert await ws.receive_bytes(timeout=5) == b"two" * 100_000
            await ws.close()
            assert ws.close_code == aiohttp.WSCloseCode.OK
        await asyncio.wait_for(app.closed.wait(), 5)
    finally:
        await outbound.stop()
        await inbound.stop()
    assert_no_tunnel_tasks()


def test_echo_on_uvloop() -> None:
    """The sidecar runs on uvloop: the hand-over works there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        echo = EchoApp()
        app_runner, echo.port = await serve(echo.handle)
        try:
            async with (
                tunnel_server(echo.port) as proxy,
                aiohttp.ClientSession() as session,
                session.ws_connect(f"http://127.0.0.1:{proxy}/ws") as ws,
            ):
                payload = os.urandom(512 * 1024)
                await ws.send_bytes(payload)
                assert await ws.receive_bytes(timeout=5) == payload
                await ws.close()
                await asyncio.wait_for(echo.closed.wait(), 5)
        finally:
            await app_runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
