"""The Status API, ``/v1/status``: the Raft leader and peers (the agent is its only server)."""

from __future__ import annotations

from aiohttp import web

from .core import AgentCore, Route
from .protocol import SERVER_ADDR, _json


class StatusAPI(AgentCore):
    """The ``/v1/status`` endpoints."""

    async def h_status_leader(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        return _json(SERVER_ADDR)

    async def h_status_peers(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        return _json([SERVER_ADDR])

    def routes(self) -> list[Route]:
        return [
            *super().routes(),
            Route("/v1/status/leader", ("GET",), self.h_status_leader),
            Route("/v1/status/peers", ("GET",), self.h_status_peers),
        ]
