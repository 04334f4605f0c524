"""A recording HTTP/1.1 app for the reliability tests (tests/test_reliability.py).

    python -m tests.apps.upload_app --port P --record FILE [--mode MODE] [--delay S] [--name NAME]

With --port 0 the kernel picks the port; "upload_app listening on HOST:PORT" says which.

Plain asyncio, so that the framing of every request body and the moment a connection
breaks are seen exactly. For every request but `/health` and `/_control` it appends JSON
lines to FILE (flushed at once):

    {"event": "head", "rid", "method", "path", ...}            when the head has arrived
    {"event": "end", "rid", "method", "path", "framing": "length" | "chunked" | "none",
     "received": body bytes read, "expected": X-Body-Length (or null),
     "complete": the body's framing ended properly, "outcome": what happened next,
     "elapsed": seconds since the head}                         when the request is over

`outcome` is "answered <status>", "aborted" (the connection closed or was reset while the
app was reading the body or waiting `--delay` before its answer) or "early" (the answer
went before the body was read). A body stored whole is an "end" with `complete` true and
an "answered 200" outcome.

What it answers (for every path; `--mode`, changeable at run time):
  store      read the body, wait --delay seconds (watching the connection), 200 JSON
             {"name", "received"}
  early503   503 at once, before reading the body (then read and drop the body, close)
  status:N   read the body, wait --delay seconds, answer N
  relay502   read the body, answer 502 with `X-Sidecar-Error: upstream_connect_failed`
             and a sidecar-like JSON body, as an app relaying its own sidecar's error
`GET /health` answers 200, or 503 after `/_control?health=fail`.
`GET /_control?mode=M&delay=S&health=ok|fail` changes the behaviour (answered 200).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import IO, Any

MAX_HEAD = 64 * 1024


class State:
    def __init__(self, record: str, mode: str, delay: float, name: str) -> None:
        self.file: IO[str] = open(record, "a", encoding="utf-8")  # lives as long as the app
        self.mode = mode
        self.delay = delay
        self.name = name
        self.healthy = True

    def log(self, **fields: Any) -> None:
        fields["time"] = round(time.time(), 6)
        fields["name"] = self.name
        self.file.write(json.dumps(fields) + "\n")
        self.file.flush()


class Aborted(Exception):
    pass


def _answer(status: int, body: bytes, extra: list[str] | None = None, close: bool = False) -> bytes:
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    head += extra or []
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def _read_body(reader: asyncio.StreamReader, framing: str, length: int, got: list[int]) -> None:
    """Read the body; raises Aborted when the connection breaks first."""
    try:
        if framing == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line[:-2].split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return
                left = size
                while left:
                    data = await reader.read(min(left, 65536))
                    if not data:
                        raise Aborted
                    left -= len(data)
                    got[0] += len(data)
                await reader.readexactly(2)
        elif framing == "length":
            left = length
            while left:
                data = await reader.read(min(left, 65536))
                if not data:
                    raise Aborted
                left -= len(data)
                got[0] += len(data)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        raise Aborted from None


async def _wait_watching(reader: asyncio.StreamReader, delay: float) -> None:
    """Sleep `delay` seconds; raises Aborted as soon as the connection closes or resets."""
    if delay <= 0:
        return
    watch = asyncio.ensure_future(reader.read(1))
    try:
        done, _ = await asyncio.wait({watch}, timeout=delay)
        if done:
            try:
                data = watch.result()
            except (ConnectionError, OSError):
                raise Aborted from None
            if not data:
                raise Aborted
            # a pipelined byte: not expected from a proxy mid-request; treat as still there
            await asyncio.sleep(delay)
    finally:
        watch.cancel()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: State) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            started = time.monotonic()
            lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, _ = [*lines[0].split(" "), "", "", ""][:3]
            headers: dict[str, str] = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            path, _, query = target.partition("?")
            params = dict(p.partition("=")[::2] for p in query.split("&") if p)
            close = "close" in headers.get("connection", "").lower()
            if path == "/health":
                ok = st.healthy
                writer.write(_answer(200 if ok else 503, b'"ok"' if ok else b'"sick"', close=close))
                await writer.drain()
                if close:
                    return
                continue
            if path == "/_control":
                if "mode" in params:
                    st.mode = params["mode"]
                if "delay" in params:
                    st.delay = float(params["delay"])
                if "health" in params:
                    st.healthy = params["health"] == "ok"
                writer.write(
                    _answer(200, json.dumps({"mode": st.mode, "delay": st.delay}).encode(), close=close)
                )
                await writer.drain()
                if close:
                    return
                continue
            rid = headers.get("x-request-id")
            te = headers.get("transfer-encoding", "").lower()
            framing = "chunked" if "chunked" in te else "length" if "content-length" in headers else "none"
            length = int(headers["content-length"]) if framing == "length" else 0
            expected_text = headers.get("x-body-length", "")
            expected = int(expected_text) if expected_text.isdigit() else None
            mode, delay = st.mode, st.delay
            st.log(event="head", rid=rid, method=method, path=target, framing=framing, expected=expected)
            got = [0]

            def end(complete: bool, outcome: str, rid: str | None = rid, method: str = method) -> None:
                st.log(
                    event="end",
                    rid=rid,
                    method=method,
                    path=target,
                    framing=framing,
                    received=got[0],
                    expected=expected,
                    complete=complete,
                    outcome=outcome,
                    elapsed=round(time.monotonic() - started, 3),
                )

            if mode == "early503":
                writer.write(_answer(503, b'{"early": true}', close=True))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                end(False, "early")
                with contextlib.suppress(Aborted):
                    await _read_body(reader, framing, length, got)
                return
            try:
                await _read_body(reader, framing, length, got)
            except Aborted:
                end(False, "aborted")
                return
            try:
                await _wait_watching(reader, delay)
            except Aborted:
                end(True, "aborted")
                return
            if mode == "relay502":
                status = 502
                body = json.dumps({"error": "upstream_connect_failed", "service": "downstream"}).encode()
                extra = ["X-Sidecar-Error: upstream_connect_failed"]
            elif mode.startswith("status:"):
                status = int(mode.split(":", 1)[1])
                body, extra = json.dumps({"name": st.name, "status": status}).encode(), []
            else:
                status = 200
                body, extra = json.dumps({"name": st.name, "received": got[0]}).encode(), []
            end(True, f"answered {status}")
            writer.write(_answer(status, body, extra, close=close))
            await writer.drain()
            if close:
                return
    except (ConnectionError, OSError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(args: argparse.Namespace) -> None:
    st = State(args.record, args.mode, args.delay, args.name or f"{args.host}:{args.port}")
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, st), args.host, args.port, limit=MAX_HEAD, reuse_address=True, backlog=1024
    )
    print(f"upload_app listening on {args.host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--record", required=True)
    parser.add_argument("--mode", default="store")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
