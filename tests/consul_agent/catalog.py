"""The Catalog API, ``/v1/catalog``: register and deregister nodes, services and checks; list
datacenters, nodes, services, a service's instances, its Connect-capable instances, a node's
services and a gateway's services (always none: the agent has no gateways)."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from .core import AgentCore, Result, Route
from .model import Check, Node, Service
from .protocol import CRITICAL, STATUSES, ConsulError, Fields, _json


class CatalogAPI(AgentCore):
    """The ``/v1/catalog`` endpoints."""

    async def h_catalog_datacenters(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        return _json([self.datacenter])

    async def h_catalog_register(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        authz, _secret = self._authz(request)
        f = Fields(raw, "RegisterRequest")
        self._check_dc(f.text("Datacenter"))
        node_name = f.text("Node")
        if not node_name:
            raise ConsulError(400, "Missing node name")
        existing = self._nodes.get(node_name)
        skip = f.flag("SkipNodeUpdate") and existing is not None
        address = f.text("Address")
        if not address and not skip:
            raise ConsulError(400, "Missing node address")
        if address in ("0.0.0.0", "::") and not skip:
            raise ConsulError(400, "Invalid node address")
        svc = None
        if f.get("Service") is not None:
            sf = Fields(f.get("Service"), "RegisterRequest.Service")
            name = sf.text("Service", "Name")
            if not name:
                raise ConsulError(500, "Must provide service name (Service.Service) with ID (Service.ID)")
            tagged: dict[str, dict[str, Any]] = {}
            for tag, value in (sf.get("TaggedAddresses") or {}).items():
                tf = Fields(value, "ServiceAddress")
                tagged[tag] = {"Address": tf.text("Address"), "Port": tf.integer("Port")}
            svc = Service(
                node=node_name,
                id=sf.text("ID") or name,
                name=name,
                tags=sf.str_list("Tags"),
                address=sf.text("Address"),
                port=sf.integer("Port"),
                meta=sf.str_map("Meta"),
                enable_tag_override=sf.flag("EnableTagOverride"),
                tagged_addresses=tagged,
                kind=sf.text("Kind"),
            )
            if sf.get("Weights") is not None:
                wf = Fields(sf.get("Weights"), "Weights")
                svc.weights = {"Passing": wf.integer("Passing"), "Warning": wf.integer("Warning")}
        raw_checks = []
        if f.get("Check") is not None:
            raw_checks.append(f.get("Check"))
        for item in f.get("Checks") or []:
            raw_checks.append(item)
        authz.require("node", "write", node_name)
        if svc is not None:
            authz.require("service", "write", svc.name)
        index = self._next_index()
        if not skip:
            tagged_node = f.get("TaggedAddresses")
            node = Node(
                id=f.text("ID") or (existing.id if existing else str(uuid.uuid4())),
                name=node_name,
                address=address,
                datacenter=self.datacenter,
                tagged_addresses=dict(tagged_node) if isinstance(tagged_node, dict) else None,
                meta=f.str_map("NodeMeta") or None,
            )
            if existing is None or _node_fields(existing) != _node_fields(node):
                self._put_node(node, index)
        if svc is not None:
            self._put_service(svc, index)
        for raw_check in raw_checks:
            cf = Fields(raw_check, "HealthCheck")
            check_id = cf.text("CheckID") or cf.text("Name")
            service_id = cf.text("ServiceID")
            owner = self._services.get((node_name, service_id)) if service_id else None
            if service_id and owner is None:
                raise ConsulError(500, "Missing service registration")
            status = cf.text("Status") or CRITICAL
            if status not in STATUSES:
                raise ConsulError(500, f"Invalid check status: '{status}'")
            check = Check(
                node=node_name,
                check_id=check_id,
                name=cf.text("Name"),
                status=status,
                notes=cf.text("Notes"),
                output=cf.text("Output"),
                service_id=service_id,
                service_name=owner.name if owner else "",
                service_tags=list(owner.tags) if owner else [],
                type=cf.text("Type"),
            )
            if owner is not None:
                authz.require("service", "write", owner.name)
            self._put_check(check, index)
        self._notify()
        return _json(True)

    async def h_catalog_deregister(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        authz, _secret = self._authz(request)
        f = Fields(raw, "DeregisterRequest")
        self._check_dc(f.text("Datacenter"))
        node_name = f.text("Node")
        if not node_name:
            raise ConsulError(400, "Missing node name")
        service_id, check_id = f.text("ServiceID"), f.text("CheckID")
        index = self._next_index()
        if service_id:
            svc = self._services.get((node_name, service_id))
            if svc is not None:
                authz.require("service", "write", svc.name)
                self._delete_service((node_name, service_id), index)
        elif check_id:
            check = self._checks.get((node_name, check_id))
            if check is not None:
                if check.service_id:
                    authz.require("service", "write", check.service_name)
                else:
                    authz.require("node", "write", node_name)
                self._delete_check((node_name, check_id), index)
        else:
            authz.require("node", "write", node_name)
            if node_name in self._nodes:
                for key in [k for k in self._services if k[0] == node_name]:
                    self._delete_service(key, index)
                for key in [k for k in self._checks if k[0] == node_name]:
                    self._delete_check(key, index)
                del self._nodes[node_name]
                self._tables["nodes"] = index
        self._notify()
        return _json(True)

    async def h_catalog_nodes(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            nodes = [n.to_json() for n in sorted(self._nodes.values(), key=lambda n: n.name)]
            nodes = [n for n in nodes if self._node_meta_ok(request, self._nodes[n["Node"]])]
            if filt:
                nodes = [n for n in nodes if filt.matches(n)]
            visible = [n for n in nodes if authz.can_read_node(n["Node"])]
            return Result(self._tables["nodes"], visible, filtered=len(visible) != len(nodes))

        return await self._query(request, compute, secret)

    async def h_catalog_services(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            grouped: dict[str, set[str]] = {}
            filtered = False
            for svc in sorted(self._services.values(), key=lambda s: (s.name, s.node, s.id)):
                node = self._nodes[svc.node]
                if not self._node_meta_ok(request, node):
                    continue
                if filt and not filt.matches(svc.service_node_json(node)):
                    continue
                if not (authz.can_read_service(svc.name) and authz.can_read_node(svc.node)):
                    filtered = True
                    continue
                grouped.setdefault(svc.name, set()).update(svc.tags)
            data = {name: sorted(tags) for name, tags in sorted(grouped.items())}
            return Result(self._tables["services"], data, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_catalog_service(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            items, filtered = [], False
            if not peer:
                for svc in self.instances(name):
                    node = self._nodes[svc.node]
                    if not (self._tags_ok(request, svc) and self._node_meta_ok(request, node)):
                        continue
                    item = svc.service_node_json(node)
                    if filt and not filt.matches(item):
                        continue
                    if not (authz.can_read_service(svc.name) and authz.can_read_node(svc.node)):
                        filtered = True
                        continue
                    items.append(item)
            return Result(self._service_index_for(name, False), items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_catalog_connect(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            items = []
            for svc in [] if peer else self._connect_instances(name):
                item = svc.service_node_json(self._nodes[svc.node])
                if filt and not filt.matches(item):
                    continue
                if authz.can_read_service(svc.name) and authz.can_read_node(svc.node):
                    items.append(item)
            return Result(self._service_index_for(name, False), items, empty=not items)

        return await self._query(request, compute, secret)

    async def h_catalog_gateway_services(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        _authz, secret = self._authz(request)
        return await self._query(request, lambda: Result(self._tables["services"], [], empty=True), secret)

    async def h_catalog_node(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            index = max(self._tables["nodes"], self._tables["services"])
            node = self._nodes.get(name)
            if node is None or not authz.can_read_node(name):
                return Result(index, None, empty=True, filtered=node is not None)
            services = {}
            for svc in sorted(self._services.values(), key=lambda s: s.id):
                if svc.node != name:
                    continue
                item = svc.catalog_json()
                if filt and not filt.matches(item):
                    continue
                if authz.can_read_service(svc.name):
                    services[svc.id] = item
            return Result(index, {"Node": node.to_json(), "Services": services})

        return await self._query(request, compute, secret)

    def routes(self) -> list[Route]:
        return [
            *super().routes(),
            Route("/v1/catalog/register", ("PUT",), self.h_catalog_register),
            Route("/v1/catalog/deregister", ("PUT",), self.h_catalog_deregister),
            Route("/v1/catalog/datacenters", ("GET",), self.h_catalog_datacenters),
            Route("/v1/catalog/nodes", ("GET",), self.h_catalog_nodes),
            Route("/v1/catalog/services", ("GET",), self.h_catalog_services),
            Route("/v1/catalog/service/", ("GET",), self.h_catalog_service, prefix=True),
            Route("/v1/catalog/connect/", ("GET",), self.h_catalog_connect, prefix=True),
            Route("/v1/catalog/node/", ("GET",), self.h_catalog_node, prefix=True),
            Route("/v1/catalog/gateway-services/", ("GET",), self.h_catalog_gateway_services, prefix=True),
        ]


def _node_fields(node: Node) -> dict[str, Any]:
    return dict(node.to_json(), CreateIndex=0, ModifyIndex=0)
