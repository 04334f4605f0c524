"""The web UI's addresses: ``/`` redirects to ``/ui/``, which serves a placeholder page."""

from __future__ import annotations

from aiohttp import web

from .core import AgentCore, Route


class UIPages(AgentCore):
    """``/`` and ``/ui/``."""

    async def h_root(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        return web.Response(status=301, headers={"Location": "/ui/"})

    async def h_ui(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        return web.Response(
            text="<!doctype html><title>Consul by HashiCorp</title>\n", content_type="text/html"
        )

    def routes(self) -> list[Route]:
        return [
            *super().routes(),
            Route("/", ("GET",), self.h_root),
            Route("/ui/", ("GET",), self.h_ui),
            Route("/ui/", ("GET",), self.h_ui, prefix=True),
        ]
