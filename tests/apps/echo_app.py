"""A small HTTP app for the tests: echoes requests, streams big bodies, sleeps, fails on demand.

python -m tests.apps.echo_app --port N [--name NAME]

With --port 0 it listens on a port the kernel picks; either way it prints
"echo_app listening on HOST:PORT" once the port is bound (tests.helpers.App reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket

from aiohttp import web

state = {"healthy": True}


async def health(request: web.Request) -> web.Response:
    if not state["healthy"]:
        return web.Response(status=503, text="sick\n")
    return web.Response(text="ok\n")


async def set_health(request: web.Request) -> web.Response:
    state["healthy"] = request.query.get("ok", "1") == "1"
    return web.Response(text=f"healthy={state['healthy']}\n")


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "app": request.app["name"],
            "pid": os.getpid(),
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
        },
        headers={"Connection": "keep-alive, X-Hop", "X-Hop": "must-not-pass", "Keep-Alive": "timeout=5"},
    )


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "1")))
    return web.Response(text="slow done\n")


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"size": size, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "0"))
    resp = web.StreamResponse()
    resp.content_length = size
    await resp.prepare(request)
    block = b"x" * (256 * 1024)
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        await resp.write(piece)
        sent += len(piece)
    await resp.write_eof()
    return resp


async def events(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i in range(int(request.query.get("count", "3"))):
        await resp.write(f"data: event {i}\n\n".encode())
        await asyncio.sleep(float(request.query.get("gap", "0.2")))
    await resp.write_eof()
    return resp


def make_app(name: str) -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app["name"] = name
    app.router.add_get("/health", health)
    app.router.add_post("/_health", set_health)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/events", events)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="echo")
    args = parser.parse_args()
    # Bind here, not in run_app, to say which port we got: no free port has to be guessed
    # before the app starts (another process could take it in between).
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    print(f"echo_app listening on {args.host}:{sock.getsockname()[1]}", flush=True)
    web.run_app(make_app(args.name), sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
