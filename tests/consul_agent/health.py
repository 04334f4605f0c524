"""The Health API, ``/v1/health``: a service's instances with their checks (``?passing``), its
Connect-capable and ingress instances, and the checks of a service, of a node or in a state.
Every list is a blocking query."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .core import AgentCore, Authz, Result, Route
from .filter import Filter
from .model import Check, Service
from .protocol import PASSING, STATUSES, ConsulError, _parse_go_bool


class HealthAPI(AgentCore):
    """The ``/v1/health`` endpoints."""

    def _passing_param(self, request: web.BaseRequest) -> bool:
        if "passing" not in request.query:
            return False
        value = _parse_go_bool(request.query["passing"] or "true")
        if value is None:
            raise ConsulError(400, f"Invalid value for ?passing: {request.query['passing']!r}")
        return value

    def _entries(
        self, request: web.BaseRequest, services: list[Service], authz: Authz, filt: Filter | None
    ) -> tuple[list[dict[str, Any]], bool]:
        passing = self._passing_param(request)
        entries, filtered = [], False
        for svc in services:
            node = self._nodes[svc.node]
            if not (self._tags_ok(request, svc) and self._node_meta_ok(request, node)):
                continue
            entry = self.service_entry(svc)
            if passing and any(c["Status"] != PASSING for c in entry["Checks"]):
                continue
            if filt and not filt.matches(entry):
                continue
            if not (authz.can_read_service(svc.name) and authz.can_read_node(svc.node)):
                filtered = True
                continue
            entries.append(entry)
        return entries, filtered

    async def h_health_service(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        self._passing_param(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            services = [] if peer else self.instances(name)
            entries, filtered = self._entries(request, services, authz, filt)
            return Result(self._service_index_for(name, True), entries, empty=not entries, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_connect(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            services = [] if peer else self._connect_instances(name)
            entries, filtered = self._entries(request, services, authz, filt)
            return Result(self._service_index_for(name, True), entries, empty=not entries, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_ingress(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        _authz, secret = self._authz(request)
        self._filter(request)
        return await self._query(
            request, lambda: Result(self._service_index_for(name, True), [], empty=True), secret
        )

    def _check_list(
        self, checks: Iterable[Check], authz: Authz, filt: Filter | None
    ) -> tuple[list[dict[str, Any]], bool]:
        out, filtered = [], False
        for check in sorted(checks, key=lambda c: (c.node, c.check_id)):
            item = check.to_json()
            if filt and not filt.matches(item):
                continue
            readable = authz.can_read_node(check.node) and (
                not check.service_id or authz.can_read_service(check.service_name)
            )
            if not readable:
                filtered = True
                continue
            out.append(item)
        return out, filtered

    async def h_health_checks(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            checks = [c for c in self._checks.values() if c.service_id and c.service_name == name]
            checks = [c for c in checks if self._node_meta_ok(request, self._nodes[c.node])]
            items, filtered = self._check_list(checks, authz, filt)
            return Result(self._tables["checks"], items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_node(self, request: web.BaseRequest, node: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            items, filtered = self._check_list(
                (c for c in self._checks.values() if c.node == node), authz, filt
            )
            return Result(self._tables["checks"], items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_state(self, request: web.BaseRequest, state: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        if state not in (*STATUSES, "any"):
            raise ConsulError(400, "Invalid state")
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            checks = [c for c in self._checks.values() if state == "any" or c.status == state]
            checks = [c for c in checks if self._node_meta_ok(request, self._nodes[c.node])]
            items, filtered = self._check_list(checks, authz, filt)
            return Result(self._tables["checks"], items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    def routes(self) -> list[Route]:
        return [
            *super().routes(),
            Route("/v1/health/service/", ("GET",), self.h_health_service, prefix=True),
            Route("/v1/health/connect/", ("GET",), self.h_health_connect, prefix=True),
            Route("/v1/health/ingress/", ("GET",), self.h_health_ingress, prefix=True),
            Route("/v1/health/checks/", ("GET",), self.h_health_checks, prefix=True),
            Route("/v1/health/node/", ("GET",), self.h_health_node, prefix=True),
            Route("/v1/health/state/", ("GET",), self.h_health_state, prefix=True),
        ]
