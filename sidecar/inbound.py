"""The inbound listener: mesh -> sidecar -> app, gated by the app's health."""

from __future__ import annotations

from aiohttp import web

from .errors import AppUnhealthy, SidecarError, error_response
from .forward import REQUEST_ID, Forwarder
from .health import HealthChecker


class Inbound:
    def __init__(
        self, name: str, app_host: str, app_port: int, health: HealthChecker, forwarder: Forwarder
    ) -> None:
        self.name = name
        host = f"[{app_host}]" if ":" in app_host else app_host
        self.app_endpoint = f"{host}:{app_port}"
        self.health = health
        self.forwarder = forwarder
        self.requests = 0

    def __repr__(self) -> str:
        return f"<Inbound -> {self.app_endpoint} requests={self.requests} active={self.forwarder.active}>"

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        try:
            if not self.health.healthy:
                raise AppUnhealthy(f"app {self.name!r} is unhealthy: {self.health.state.output}")
            path = request.raw_path
            if not path.startswith("/"):  # absolute-form target: keep only path and query
                path = str(request.rel_url)
            return await self.forwarder.forward(request, self.app_endpoint, path)
        except SidecarError as err:
            return error_response(err, self.name, request.headers.get(REQUEST_ID))
