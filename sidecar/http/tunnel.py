"""WebSocket tunnelling: an HTTP/1.1 Upgrade request carried to one endpoint, then raw bytes.

The normal forwarding path strips `Upgrade` (it is hop-by-hop). A WebSocket handshake
instead goes through `tunnel()`: the sidecar opens a plain TCP connection to the endpoint,
writes the request head itself (the forwarded headers plus `Connection: Upgrade` and the
client's `Upgrade`), and reads the endpoint's response head.

- Anything but 101 is relayed like a normal response (hop-by-hop headers stripped, the
  body re-framed by aiohttp), and the upstream socket is closed.
- 101 is relayed to the client (the app's `Upgrade`, `Sec-WebSocket-Accept`, protocol and
  extensions, plus X-Request-Id), and from then on bytes are copied both ways until either
  side closes or nothing moved for `idle_timeout` seconds.

How the client connection is taken over (server.ClientConnection):
- llhttp (aiohttp's C parser) switches to "upgraded" mode after a bodiless request with
  `Connection: upgrade` and `Upgrade: websocket`; bytes that arrive afterwards are not
  parsed as HTTP but held by the connection.
- the 101 goes out with `Request.start(..., raw=True)`: no body framing; the tunnelled
  bytes then go through `Request.write` (plain writes, drained past 64 KiB).
- `Request.take_over()` hands the held bytes and every later one to an aiohttp
  `StreamReader`: that pauses reading from the client when the upstream is slow, and gets
  EOF when the client closes.
- after an upgrade request the connection is always closed when the handler returns,
  never parsed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator

from multidict import CIMultiDict

from ..errors import (
    BadRequest,
    PeerIdentityMismatch,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from .headers import REQUEST_ID, connection_listed, strip_hop_by_hop
from .messages import Headers, Request, Response
from .tls import ClientTLS, PeerRejected, peer_certificate

log = logging.getLogger(__name__)

HEAD_LIMIT = 64 * 1024  # the largest response head (and chunk-size line) accepted from upstream
CHUNK = 64 * 1024
CLOSE_WAIT = 1.0  # how long closing the upstream socket may take to flush before it is aborted
MAX_INTERIM = 16  # 1xx interim answers (103 Early Hints...) skipped before the real one

_STATUS_LINE = re.compile(r"HTTP/1\.[01] ([1-9][0-9]{2})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORBIDDEN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")


def is_upgrade(request: Request) -> bool:
    """True for a WebSocket handshake that `tunnel()` should carry.

    The same conditions under which the parser switches the connection to upgraded
    mode: GET, HTTP/1.1, no body, `Connection` listing `upgrade`, and one
    `Upgrade: websocket`. Any other Upgrade token is refused here; the normal path
    strips it and the app sees a plain request.
    """
    if "Upgrade" not in request.headers:
        return False
    if request.method != "GET" or request.version != (1, 1) or request.body_exists:
        return False
    if "upgrade" not in connection_listed(request.headers):
        return False
    upgrades = request.headers.getall("Upgrade", ())
    return len(upgrades) == 1 and upgrades[0].strip().lower() == "websocket"


async def tunnel(
    request: Request,
    endpoint: str,
    path: str,
    headers: CIMultiDict[str],
    request_id: str,
    *,
    connect_timeout: float,
    response_timeout: float,
    idle_timeout: float,
    tls: ClientTLS | None = None,
) -> Response:
    """Carry the WebSocket handshake `request` to `http(s)://<endpoint><path>` (with `tls`:
    mutual TLS, and the peer must present `tls.service`'s identity).

    `headers` are the forwarded request headers (hop-by-hop already stripped). Failures
    before anything reaches the client raise a SidecarError (502/504); the returned
    response has been sent already.
    Only call it when `is_upgrade(request)` is true.
    """
    head = _request_head(request, endpoint, path, headers)
    reader, writer = await _connect(endpoint, connect_timeout, tls)
    try:
        status, reason, upstream_headers = await _exchange_head(
            reader, writer, head, endpoint, response_timeout
        )
        if status == 101:
            await _splice(
                request,
                _switching_headers(upstream_headers, request_id, endpoint),
                reader,
                writer,
                idle_timeout,
            )
        else:
            await _relay(
                request, status, reason, upstream_headers, request_id, reader, endpoint, response_timeout
            )
        return Response(status, request_id=upstream_headers.get(REQUEST_ID, request_id), sent=True)
    finally:
        await _close(writer)


# -- the request ------------------------------------------------------------------------


def _request_head(request: Request, endpoint: str, path: str, headers: CIMultiDict[str]) -> bytes:
    if not path.startswith("/") or _FORBIDDEN_VALUE.search(path) or " " in path:
        raise BadRequest("the request target cannot be forwarded")
    lines = [f"GET {path} HTTP/1.1"]
    if "Host" not in headers:
        lines.append(f"Host: {endpoint}")
    for key, value in headers.items():
        if key.lower() in ("connection", "upgrade"):
            continue
        if not _TOKEN.fullmatch(key) or _FORBIDDEN_VALUE.search(value):
            raise BadRequest(f"header {key!r} cannot be forwarded")
        lines.append(f"{key}: {value}")
    lines.append("Connection: Upgrade")
    lines.append(f"Upgrade: {request.headers['Upgrade'].strip()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise UpstreamConnectError(f"cannot connect to {endpoint}: not a host:port address")
    return host.removeprefix("[").removesuffix("]"), int(port)


async def _connect(
    endpoint: str, timeout: float, tls: ClientTLS | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = _split_endpoint(endpoint)
    try:
        async with asyncio.timeout(timeout):
            if tls is None:
                return await asyncio.open_connection(host, port, limit=HEAD_LIMIT)
            reader, writer = await asyncio.open_connection(
                host, port, limit=HEAD_LIMIT, ssl=tls.context(), server_hostname=""
            )
        try:
            tls.check_peer(peer_certificate(writer.get_extra_info("ssl_object")))
        except PeerRejected as exc:
            writer.transport.abort()
            raise PeerIdentityMismatch(f"{endpoint}: {exc}") from exc
        return reader, writer
    except TimeoutError as exc:
        raise UpstreamTimeout(f"timed out connecting to {endpoint}") from exc
    except OSError as exc:
        raise UpstreamConnectError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from exc


async def _exchange_head(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: bytes,
    endpoint: str,
    timeout: float,
) -> tuple[int, str, CIMultiDict[str]]:
    """Send the request head and read the final response head (1xx interims skipped)."""
    try:
        async with asyncio.timeout(timeout):
            writer.write(head)
            await writer.drain()
            for _ in range(MAX_INTERIM):
                raw = await reader.readuntil(b"\r\n\r\n")
                status, reason, headers = _parse_head(raw, endpoint)
                if status == 101 or status >= 200:
                    return status, reason, headers
    except TimeoutError as exc:
        raise UpstreamTimeout(f"timed out waiting for {endpoint}") from exc
    except asyncio.LimitOverrunError as exc:
        raise UpstreamProtocolError(f"{endpoint} sent a response head over {HEAD_LIMIT} bytes") from exc
    except asyncio.IncompleteReadError as exc:
        raise UpstreamProtocolError(f"{endpoint} closed the connection without answering") from exc
    except OSError as exc:
        raise UpstreamProtocolError(f"{endpoint} failed: {exc.strerror or exc}") from exc
    raise UpstreamProtocolError(f"{endpoint} sent too many interim responses")


def _parse_head(raw: bytes, endpoint: str) -> tuple[int, str, CIMultiDict[str]]:
    """Status, reason and headers of one response head; strict, raises UpstreamProtocolError."""
    lines = raw[:-4].decode("utf-8", "surrogateescape").split("\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise UpstreamProtocolError(f"{endpoint} sent a malformed status line")
    status = int(match.group(1))
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # no obs-fold, no space before the colon, no control characters (RFC 9112 5)
        if not colon or not _TOKEN.fullmatch(name):
            raise UpstreamProtocolError(f"{endpoint} sent a malformed header line")
        value = value.strip(" \t")
        if _FORBIDDEN_VALUE.search(value):
            raise UpstreamProtocolError(f"{endpoint} sent a control character in header {name!r}")
        headers.add(name, value)
    lengths = {v.strip() for v in ",".join(headers.getall("Content-Length", ())).split(",") if v.strip()}
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise UpstreamProtocolError(f"{endpoint} sent an invalid Content-Length")
    if lengths and "Transfer-Encoding" in headers:
        raise UpstreamProtocolError(f"{endpoint} sent both Content-Length and Transfer-Encoding")
    return status, match.group(2) or "", headers


# -- anything but 101: an ordinary response -----------------------------------------------


async def _relay(
    request: Request,
    status: int,
    reason: str,
    upstream: CIMultiDict[str],
    request_id: str,
    reader: asyncio.StreamReader,
    endpoint: str,
    timeout: float,
) -> None:
    chunked = "Transfer-Encoding" in upstream
    if chunked and [c.strip().lower() for c in upstream.getall("Transfer-Encoding")] != ["chunked"]:
        raise UpstreamProtocolError(f"{endpoint} sent a transfer coding other than chunked")
    raw_length = upstream.get("Content-Length")
    length = int(raw_length.split(",")[0]) if raw_length is not None else None
    headers = strip_hop_by_hop(upstream)
    headers.popall("Content-Length", None)
    headers[REQUEST_ID] = upstream.get(REQUEST_ID, request_id)
    if status in (204, 304):  # (no HEAD here: only a GET is an upgrade)
        chunked, length = False, 0
    try:
        # chunked when the length is unknown: the app's chunks, or a body that runs until its close
        await request.start(status, headers.items(), length, reason=reason or None)
    except ConnectionError:
        return  # the client left
    body = _read_chunked(reader, timeout) if chunked else _read_plain(reader, length, timeout)
    try:
        async with contextlib.aclosing(body):
            async for data in body:
                await request.write(data)
        await request.end()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError, ValueError) as exc:
        # The head is gone already: the only honest answer is a broken connection.
        if request.transport is not None and not request.client_gone():
            log.warning("relaying the answer of %s to an upgrade broke: %r", endpoint, exc)
            request.transport.abort()


async def _read_plain(
    reader: asyncio.StreamReader, length: int | None, timeout: float
) -> AsyncGenerator[bytes, None]:
    remaining = length
    while remaining is None or remaining > 0:
        size = CHUNK if remaining is None else min(CHUNK, remaining)
        async with asyncio.timeout(timeout):
            data = await reader.read(size)
        if not data:
            if remaining is None:
                return
            raise asyncio.IncompleteReadError(b"", remaining)
        if remaining is not None:
            remaining -= len(data)
        yield data


async def _read_chunked(reader: asyncio.StreamReader, timeout: float) -> AsyncGenerator[bytes, None]:
    while True:
        async with asyncio.timeout(timeout):
            line = await reader.readuntil(b"\r\n")
        match = _CHUNK_SIZE.fullmatch(line[:-2])
        if match is None:
            raise ValueError("malformed chunk size line")
        size = int(match.group(1), 16)
        if size == 0:
            break
        while size > 0:
            async with asyncio.timeout(timeout):
                data = await reader.readexactly(min(CHUNK, size))
            size -= len(data)
            yield data
        async with asyncio.timeout(timeout):
            if await reader.readexactly(2) != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
    while True:  # trailer fields: read and dropped
        async with asyncio.timeout(timeout):
            if await reader.readuntil(b"\r\n") == b"\r\n":
                return


# -- 101: the tunnel ------------------------------------------------------------------------


def _switching_headers(upstream: CIMultiDict[str], request_id: str, endpoint: str) -> Headers:
    upgrade = upstream.get("Upgrade", "").strip()
    if upgrade.lower() != "websocket":
        raise UpstreamProtocolError(f"{endpoint} switched to {upgrade!r}, not the websocket asked for")
    headers = strip_hop_by_hop(upstream)
    for framing in ("Content-Length", "Transfer-Encoding"):
        headers.popall(framing, None)
    headers["Upgrade"] = upgrade
    headers["Connection"] = "Upgrade"
    headers[REQUEST_ID] = upstream.get(REQUEST_ID, request_id)
    return list(headers.items())


async def _splice(
    request: Request,
    headers: Headers,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    idle_timeout: float,
) -> None:
    """Send the 101, then copy bytes both ways until a side closes or the tunnel idles."""
    try:
        await request.start(101, headers, None, raw=True)
    except ConnectionError:
        return  # the client left while the app answered
    loop = asyncio.get_running_loop()
    from_client = request.take_over()
    last = loop.time()

    async def client_to_app() -> None:
        nonlocal last
        while data := await from_client.readany():
            last = loop.time()
            writer.write(data)
            await writer.drain()
            last = loop.time()

    async def app_to_client() -> None:
        nonlocal last
        while data := await reader.read(CHUNK):
            last = loop.time()
            await request.write(data)
            last = loop.time()

    pumps = {
        asyncio.create_task(client_to_app(), name="tunnel client->app"),
        asyncio.create_task(app_to_client(), name="tunnel app->client"),
    }
    idle = False
    try:
        while True:
            remaining = last + idle_timeout - loop.time()
            if remaining <= 0:
                idle = True
                break
            done, _ = await asyncio.wait(pumps, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if done:
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        log.debug("tunnel %s ended: %r", task.get_name(), task.exception())
                break
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    client = request.transport
    if idle and client is not None and client.get_write_buffer_size():
        # Nothing moved and the client is not reading what it was sent: do not let the
        # graceful close that follows wait for it (the upstream side is bounded
        # by CLOSE_WAIT in _close).
        client.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close the upstream socket, flushing what is buffered for at most CLOSE_WAIT."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_WAIT):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
