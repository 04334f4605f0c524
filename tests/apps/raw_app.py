"""A raw asyncio HTTP/1.1 app for the hardening tests: it answers with crafted bytes.

python -m tests.apps.raw_app --port N [--record FILE] [--mode MODE] [--idle-timeout S]

Its parser is deliberately lenient (it must see whatever a proxy lets through), and it
appends one JSON line per request head it receives to --record (before reading the body),
so a test can tell whether anything reached the app. Requests for /health are answered
200 and not recorded.

What it answers is chosen by the path (or, for every path, by --mode):
  /echo, anything else   200 JSON {method, target, version, headers, body_len}
  /hop-response          200 with hop-by-hop headers (Connection-listed too) that must not pass
  /bad-header-bytes      a NUL in a header value
  /bad-status            a status line that is not one
  /obs-fold              an obs-folded header line
  /short-body            Content-Length 100, 10 bytes, close
  /chunked-truncated     chunked, one chunk, close without the last chunk
  /te-gzip               Transfer-Encoding: gzip, body delimited by close
  /te-gzip-chunked       Transfer-Encoding: gzip, chunked
  /cl-te                 Content-Length and Transfer-Encoding: chunked
  /dup-cl                two different Content-Length headers
  /huge-header           a 100 KiB header
  /close-empty           close without answering
  /reset                 reset the connection (RST) after reading the request
  /slow?s=N              answer after N seconds
  /ws                    101 + echo every byte back when asked for a WebSocket upgrade
  /ws-refuse             403, whatever the request asks for
Modes: echo (default: by path), reset (every request is reset), stall (never answer).
--idle-timeout S closes a keep-alive connection after S idle seconds (0: never).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import struct

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_HEAD = 1024 * 1024


class App:
    def __init__(self, record: str | None, mode: str, idle_timeout: float) -> None:
        self.record = open(record, "a", buffering=1) if record else None
        self.mode = mode
        self.idle_timeout = idle_timeout

    def log(self, entry: dict[str, object]) -> None:
        if self.record is not None:
            self.record.write(json.dumps(entry) + "\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = True
            while True:
                timeout = None if first or not self.idle_timeout else self.idle_timeout
                first = False
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                if not await self.one(head, reader, writer):
                    return
        except (OSError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def one(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        method, target, version = [*parts, "", "", ""][:3]
        headers: list[list[str]] = []
        for line in lines[1:]:
            key, _, value = line.decode("latin-1").partition(":")
            headers.append([key, value.strip()])
        lower = {k.lower(): v for k, v in headers}
        path = target.split("?", 1)[0]
        if path != "/health":
            self.log({"method": method, "target": target, "version": version, "headers": headers})

        body_len = 0
        if "chunked" in lower.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                await reader.readexactly(size + 2)
                body_len += size
        elif lower.get("content-length", "").strip().isdigit():
            body_len = int(lower["content-length"])
            await reader.readexactly(body_len)

        if self.mode == "stall":
            await asyncio.sleep(3600)
        if self.mode == "reset" or path == "/reset":
            reset(writer)
            return False
        if path == "/health":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            await writer.drain()
            return True
        if path == "/slow":
            query = dict(p.partition("=")[::2] for p in target.partition("?")[2].split("&") if p)
            await asyncio.sleep(float(query.get("s", "1")))
        crafted = CRAFTED.get(path)
        if crafted is not None:
            writer.write(crafted)
            await writer.drain()
            return False
        if path == "/close-empty":
            return False
        if path == "/ws" and "websocket" in lower.get("upgrade", "").lower():
            key = lower.get("sec-websocket-key", "")
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
            )
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            return False
        if path == "/stream":  # a chunked body whose end comes later than its head
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"6\r\n world\r\n0\r\n\r\n")
            await writer.drain()
            return True
        if path == "/ws-refuse":
            return await answer(writer, 403, {"refused": True})
        if path == "/hop-response":
            body = b"hop\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Resp-Hop\r\nX-Resp-Hop: secret\r\n"
                b"Keep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
                b"X-End: ok\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
            return True
        info = {
            "pid": os.getpid(),
            "method": method,
            "target": target,
            "version": version,
            "headers": headers,
            "body_len": body_len,
        }
        # like Node's http server, say how long an idle connection stays open
        keep_alive = f"Keep-Alive: timeout={self.idle_timeout:g}\r\n" if self.idle_timeout else ""
        return await answer(writer, 200, info, keep_alive)


async def answer(writer: asyncio.StreamWriter, status: int, data: object, extra: str = "") -> bool:
    body = json.dumps(data).encode() + b"\n"
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return True


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


CRAFTED = {
    "/bad-header-bytes": b"HTTP/1.1 200 OK\r\nX-Bad: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "/bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
    "/obs-fold": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 2\r\n\r\nok",
    "/short-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
    "/chunked-truncated": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "/te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip",
    "/te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"2\r\nok\r\n0\r\n\r\n",
    "/dup-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "/huge-header": b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * (100 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok",
}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--record", default=None)
    parser.add_argument("--mode", default="echo", choices=["echo", "reset", "stall"])
    parser.add_argument("--idle-timeout", type=float, default=0.0)
    args = parser.parse_args()
    app = App(args.record, args.mode, args.idle_timeout)
    server = await asyncio.start_server(app.handle, args.host, args.port, limit=MAX_HEAD)
    print(f"raw_app listening on {args.host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
