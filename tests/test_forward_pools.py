"""The forwarder's per-endpoint keep-alive pools, against a real server on loopback."""

from __future__ import annotations

import asyncio

from aiohttp import web
from multidict import CIMultiDict

from sidecar.forward import Forwarder


async def test_connections_are_reused_then_the_idle_pool_is_forgotten():
    peers: list[tuple[str, int]] = []

    async def handler(request: web.BaseRequest) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    forwarder = Forwarder(keepalive_timeout=0.3)
    await forwarder.start()
    endpoint = f"127.0.0.1:{site.port}"
    try:
        for _ in range(3):
            upstream = await forwarder.open("GET", endpoint, "/", CIMultiDict({"Host": "x"}), None, 5)
            assert await upstream.content.read() == b"ok"
            upstream.release()
            forwarder._done(endpoint)
        assert len(set(peers)) == 1, "a keep-alive connection should serve all three requests"
        assert forwarder.active == 0
        await asyncio.sleep(0.7)  # past the pool's idle timeout
        assert endpoint not in forwarder._pools, "an empty pool must not be kept forever"
    finally:
        await forwarder.close()
        await runner.cleanup()
