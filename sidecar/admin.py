"""The admin listener (loopback by default): /live, /ready, /status, /metrics, /shutdown."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .errors import SidecarError, error_body, error_headers


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data, indent=2) + "\n", content_type="application/json"
    )


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class Admin:
    def __init__(
        self,
        *,
        ready: Callable[[], tuple[bool, str]],
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], tuple[bytes, str]],
        shutdown: Callable[[str], None],
        name: str = "micro-sidecar",
    ) -> None:
        self._name = name
        self._ready = ready
        self._status = status
        self._metrics = metrics
        self._shutdown = shutdown

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/live", self.live)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/shutdown", self.shutdown)
        return app

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ok, reason = self._ready()
        return _json({"ready": ok, "reason": reason}, status=200 if ok else 503)

    async def status(self, request: web.Request) -> web.Response:
        return _json(self._status())

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def shutdown(self, request: web.Request) -> web.Response:
        if not _is_loopback(request.remote):
            denied = SidecarError("/shutdown is loopback-only", status=403, code="forbidden")
            return web.Response(
                status=denied.status, body=error_body(denied, self._name), headers=error_headers(denied)
            )
        self._shutdown("POST /shutdown")
        return _json({"shutting_down": True}, status=202)
