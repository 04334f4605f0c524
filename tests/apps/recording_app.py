"""An HTTP/1.1 app for the soak (bench/soak.py) that writes down every request it receives.

    python -m tests.apps.recording_app --port P --log FILE [--instance NAME]

Plain asyncio, so that the framing of every request body is seen exactly: for each request
but `GET /health` it appends one JSON line to FILE, flushed before it answers:

    {"request_id": X-Request-Id, "method", "path", "body_length": bytes received,
     "expected_length": X-Soak-Length (or null), "framing": "length" | "chunked" | "none",
     "complete": the body's framing ended properly (all Content-Length bytes, or the last
     chunk), "crc_ok": CRC-32 of the body equals X-Soak-Crc (null when not sent or not
     complete), "idempotency_key": the Idempotency-Key header (or null), "instance", "pid",
     "time": Unix time}

A body cut by a broken connection is recorded too, with "complete": false. The answer is
200 with a small JSON body (`{"instance", "received"}`); `GET /health` answers 200 "ok".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import zlib
from typing import IO, Any

MAX_HEAD = 64 * 1024
READ_SIZE = 64 * 1024


class BadRequest(Exception):
    pass


class Recorder:
    def __init__(self, path: str, instance: str) -> None:
        self.instance = instance
        self.pid = os.getpid()
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # lives as long as the app

    def record(self, **fields: Any) -> None:
        fields.update(instance=self.instance, pid=self.pid, time=round(time.time(), 6))
        self._file.write(json.dumps(fields, separators=(",", ":")) + "\n")
        self._file.flush()  # in the kernel before the answer: a SIGKILL cannot lose it


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, list[str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line {lines[0][:100]!r}")
    method, target, version = parts
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line[:100]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return method, target, version, headers


def _one(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[-1] if values else None


async def _read_chunked(reader: asyncio.StreamReader, got: list[int], crc: list[int]) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadRequest(f"bad chunk size {size_text[:40]!r}") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return
        left = size
        while left:
            data = await reader.read(min(left, READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            got[0] += len(data)
            crc[0] = zlib.crc32(data, crc[0])
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("chunk data not followed by CRLF")


async def _read_length(reader: asyncio.StreamReader, length: int, got: list[int], crc: list[int]) -> None:
    left = length
    while left:
        data = await reader.read(min(left, READ_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        got[0] += len(data)
        crc[0] = zlib.crc32(data, crc[0])


def _answer(status: str, body: bytes, request_id: str | None, close: bool) -> bytes:
    head = [
        f"HTTP/1.1 {status}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if request_id:
        head.append(f"X-Request-Id: {request_id}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: Recorder) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            try:
                method, target, version, headers = _parse_head(head[:-4])
            except BadRequest as exc:
                writer.write(_answer("400 Bad Request", json.dumps({"error": str(exc)}).encode(), None, True))
                await writer.drain()
                return
            request_id = _one(headers, "x-request-id")
            close = version != "HTTP/1.1" or "close" in (_one(headers, "connection") or "").lower()
            if method == "GET" and target.split("?", 1)[0] == "/health":
                writer.write(_answer("200 OK", b"ok\n", request_id, close))
                await writer.drain()
                if close:
                    return
                continue
            expected_text = _one(headers, "x-soak-length")
            crc_text = _one(headers, "x-soak-crc")
            te = ",".join(headers.get("transfer-encoding", [])).lower()
            lengths = headers.get("content-length", [])
            framing = "chunked" if te else "length" if lengths else "none"
            got, crc = [0], [0]
            complete, bad = True, False
            problem: str | None = None
            if (_one(headers, "expect") or "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                if te:
                    if te.replace(" ", "") != "chunked":
                        raise BadRequest(f"unsupported Transfer-Encoding {te!r}")
                    await _read_chunked(reader, got, crc)
                elif lengths:
                    if len(set(lengths)) != 1 or not lengths[0].isdigit():
                        raise BadRequest(f"bad Content-Length {lengths!r}")
                    await _read_length(reader, int(lengths[0]), got, crc)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
                complete, problem = False, f"{type(exc).__name__}: connection broke mid-body"
            except BadRequest as exc:
                complete, bad, problem = False, True, str(exc)
            crc_ok = None
            if complete and crc_text is not None:
                crc_ok = crc_text == f"{crc[0]:08x}"
            rec.record(
                request_id=request_id,
                method=method,
                path=target,
                body_length=got[0],
                expected_length=int(expected_text) if expected_text and expected_text.isdigit() else None,
                framing=framing,
                complete=complete,
                crc_ok=crc_ok,
                problem=problem,
                idempotency_key=_one(headers, "idempotency-key"),
            )
            if not complete:
                if bad:
                    with contextlib.suppress(ConnectionError):
                        writer.write(_answer("400 Bad Request", b'{"error":"bad body"}', request_id, True))
                        await writer.drain()
                return
            body = json.dumps({"instance": rec.instance, "received": got[0]}).encode()
            writer.write(_answer("200 OK", body, request_id, close))
            await writer.drain()
            if close:
                return
    except ConnectionError:
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(host: str, port: int, log: str, instance: str) -> None:
    rec = Recorder(log, instance)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, rec), host, port, limit=MAX_HEAD, reuse_address=True, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log", required=True, help="file to append one JSON line per request to")
    parser.add_argument("--instance", default=None, help="name written in each record (default host:port)")
    args = parser.parse_args()
    instance = args.instance or f"{args.host}:{args.port}"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.log, instance))


if __name__ == "__main__":
    main()
