"""The shared core of the Consul test agent: :class:`AgentCore`, which every API area builds on.

It holds what all the area modules need: the state store (nodes, services, checks, KV) and the
Raft-like index that every write raises, blocking queries (``?index=`` and ``?wait=``) over that
index, ACL token checking, the request plumbing (routing over the areas' route tables, ``?dc=``,
JSON bodies, ``?filter=``, the ``X-Consul-*`` headers), the API socket and the agent's lifecycle.
It answers no endpoint itself: each area module adds a mixin with its handlers and its
``routes()``, and server.py sums them up into the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web

from .filter import Filter, FilterError
from .model import Check, KVEntry, Node, Service
from .protocol import (
    CRITICAL,
    DATACENTER,
    PASSING,
    VERSION,
    ConsulError,
    _json,
    _text,
    parse_duration,
)

ERROR500_BODY = "No cluster leader"
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
REAP_INTERVAL = 0.1


# ---------------------------------------------------------------------------------------------
# ACL token checking (tokens are made in acl.py)


ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
LEVELS = {"deny": 0, "read": 1, "list": 1, "write": 2}


@dataclass
class Token:
    accessor_id: str
    secret_id: str
    description: str = ""
    management: bool = False
    # resource -> list of (name, is_prefix, level)
    rules: dict[str, list[tuple[str, bool, str]]] = field(default_factory=dict)


class Authz:
    """The resolved permissions of one request."""

    def __init__(self, enabled: bool, token: Token | None) -> None:
        self.enabled = enabled
        self.token = token
        self.anonymous = token is None

    def allowed(self, resource: str, level: str, name: str = "") -> bool:
        if not self.enabled or (self.token is not None and self.token.management):
            return True
        rules = self.token.rules.get(resource, []) if self.token else []
        best: tuple[int, str] | None = None  # (specificity, level)
        for rule_name, prefix, rule_level in rules:
            if prefix and name.startswith(rule_name):
                rank = len(rule_name)
            elif not prefix and name == rule_name:
                rank = 1 << 30
            else:
                continue
            if best is None or rank > best[0] or (rank == best[0] and LEVELS[rule_level] > LEVELS[best[1]]):
                best = (rank, rule_level)
        if best is None or best[1] == "deny":
            return False
        return LEVELS[best[1]] >= LEVELS[level]

    def require(self, resource: str, level: str, name: str | None = None) -> None:
        if self.allowed(resource, level, name or ""):
            return
        if self.anonymous:
            who = "anonymous token"
        else:
            assert self.token is not None
            who = f"token with AccessorID '{self.token.accessor_id}'"
        text = f"Permission denied: {who} lacks permission '{resource}:{level}'"
        if name:
            text += f' on "{name}"'
        if self.anonymous:
            text += ". The anonymous token is used implicitly when a request does not specify a token."
        raise ConsulError(403, text)

    def can_read_service(self, name: str) -> bool:
        return self.allowed("service", "read", name)

    def can_read_node(self, name: str) -> bool:
        return self.allowed("node", "read", name)


# ---------------------------------------------------------------------------------------------
# The agent's core: read results, the API socket, route tables and AgentCore


@dataclass
class Result:
    """One evaluation of a read endpoint."""

    index: int
    data: Any = None
    status: int = 200
    raw: bytes | None = None
    empty: bool = False
    filtered: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class _Listener:
    """The API socket. Closing it really refuses connections and drops the open ones."""

    def __init__(self, server: web.Server, host: str, port: int) -> None:
        self.web_server = server
        self.host = host
        self.port = port
        self.server: asyncio.base_events.Server | None = None
        self.protocols: set[Any] = set()

    def _factory(self) -> Any:
        self.protocols = {p for p in self.protocols if getattr(p, "transport", None) is not None}
        protocol = self.web_server()
        self.protocols.add(protocol)
        return protocol

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(50):
            try:
                self.server = await loop.create_server(
                    self._factory, self.host, self.port, reuse_address=True
                )
                break
            except OSError:
                if self.port == 0 or attempt == 49:
                    raise
                await asyncio.sleep(0.05)
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def is_open(self) -> bool:
        return self.server is not None

    async def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for protocol in list(self.protocols):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abort()
            with contextlib.suppress(Exception):
                protocol.force_close()
        self.protocols.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)


Handler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]


class Route(NamedTuple):
    """One entry of an area's route table: ``path`` itself, or with ``prefix`` every path under it
    (the rest of the path is the handler's second argument)."""

    path: str
    methods: tuple[str, ...]
    handler: Handler
    prefix: bool = False


class AgentCore:
    """State, index, blocking queries and request plumbing of the agent; no endpoints.

    The area mixins (agent.py, catalog.py, ...) subclass it and add their routes by overriding
    :meth:`routes`; :class:`~.server.ConsulTestAgent` is their sum.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        acl_token: str | None = None,
        node_name: str = "consul-test-agent",
        enable_script_checks: bool = False,
        self_aliases: Iterable[str] = (),
        default_intention_policy: str = "",
    ) -> None:
        if default_intention_policy not in ("", "allow", "deny"):
            raise ValueError("default_intention_policy must be '', 'allow' or 'deny'")
        self.host = host
        self.requested_port = port
        self.node_name = node_name
        self.node_id = str(uuid.uuid4())
        self.datacenter = DATACENTER
        self.acl_enabled = acl_token is not None
        self.management_token = acl_token
        self.enable_script_checks = enable_script_checks
        # The agent's default_intention_policy; "" leaves the default to the ACL default policy.
        self.default_intention_policy = default_intention_policy
        self.self_aliases = {a.lower() for a in self_aliases}
        self.fault = "none"
        self.tokens: dict[str, Token] = {}
        if acl_token is not None:
            self.tokens[acl_token] = Token(str(uuid.uuid4()), acl_token, "Initial Management Token", True)
        self.agent_tokens: dict[str, str] = {}
        self.left = asyncio.Event()
        self._listener: _Listener | None = None
        self._control: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._fault_changed = asyncio.Event()
        self._changed = asyncio.Event()
        self._epoch = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._routes = self._build_routes()
        self._reset_state()
        self._bootstrap()

    def __repr__(self) -> str:
        services = sum(1 for s in self._services.values() if s.local)
        return (
            f"<ConsulTestAgent {self.host}:{self.port} [index {self._index}, {services} services, "
            f"{len(self._kv)} keys, fault {self.fault}, acl {'on' if self.acl_enabled else 'off'}]>"
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._listener.port if self._listener else self.requested_port

    @property
    def index(self) -> int:
        return self._index

    @property
    def acl_default_policy(self) -> str:
        """``acl.default_policy``: deny with ACLs on (like a production agent), else allow."""
        return "deny" if self.acl_enabled else "allow"

    async def start(self) -> None:
        server = web.Server(self._dispatch, handler_cancellation=True)
        self._listener = _Listener(server, self.host, self.requested_port)
        await self._listener.open()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(family=socket.AF_INET, force_close=True),
            auto_decompress=True,
        )
        self._reaper = asyncio.create_task(self._reap_loop())

    async def stop(self) -> None:
        # Release hung requests first; their connections are dropped with the listener below.
        self.fault = "none"
        event, self._fault_changed = self._fault_changed, asyncio.Event()
        event.set()
        for check in self._checks.values():
            self._stop_runner(check)
        if self._reaper:
            self._reaper.cancel()
        for task in list(self._background):
            task.cancel()
        if self._listener:
            await self._listener.close()
            with contextlib.suppress(Exception):
                await self._listener.web_server.shutdown(0.1)
        if self._control:
            await self._control.cleanup()
        if self._session:
            await self._session.close()

    # -- state ------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._index = 10
        self._tables = {"nodes": 0, "services": 0, "checks": 0, "kvs": 0, "tombstones": 0}
        self._service_index: dict[str, int] = {}
        self._nodes: dict[str, Node] = {}
        self._services: dict[tuple[str, str], Service] = {}
        self._checks: dict[tuple[str, str], Check] = {}
        self._kv: dict[str, KVEntry] = {}
        self._tombstones: dict[str, int] = {}

    def _bootstrap(self) -> None:
        index = self._next_index()
        lan = {"lan": "127.0.0.1", "lan_ipv4": "127.0.0.1", "wan": "127.0.0.1", "wan_ipv4": "127.0.0.1"}
        meta = {"consul-network-segment": "", "consul-version": VERSION}
        self._put_node(Node(self.node_id, self.node_name, "127.0.0.1", self.datacenter, lan, meta), index)
        consul = Service(
            node=self.node_name,
            id="consul",
            name="consul",
            port=8300,
            meta={
                "grpc_port": "8502",
                "grpc_tls_port": "8503",
                "non_voter": "false",
                "raft_version": "3",
                "read_replica": "false",
                "serf_protocol_current": "2",
                "serf_protocol_max": "5",
                "serf_protocol_min": "1",
                "version": VERSION,
            },
        )
        self._put_service(consul, index)
        serf = Check(
            node=self.node_name,
            check_id="serfHealth",
            name="Serf Health Status",
            status=PASSING,
            output="Agent alive and reachable",
        )
        self._put_check(serf, index)
        self._notify()

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _touch_service(self, name: str, index: int) -> None:
        self._service_index[name] = index

    def _touch_node_services(self, node: str, index: int) -> None:
        for svc in self._services.values():
            if svc.node == node:
                self._touch_service(svc.name, index)

    def _put_node(self, node: Node, index: int) -> None:
        old = self._nodes.get(node.name)
        node.create_index = old.create_index if old else index
        node.modify_index = index
        self._nodes[node.name] = node
        self._tables["nodes"] = index
        self._touch_node_services(node.name, index)

    def _put_service(self, svc: Service, index: int) -> bool:
        key = (svc.node, svc.id)
        old = self._services.get(key)
        if old is not None and old.same_as(svc):
            return False
        svc.create_index = old.create_index if old else index
        svc.modify_index = index
        self._services[key] = svc
        self._tables["services"] = index
        self._touch_service(svc.name, index)
        if old is not None and old.name != svc.name:
            self._touch_service(old.name, index)
        for check in self._checks.values():
            if check.node == svc.node and check.service_id == svc.id:
                check.service_name = svc.name
                check.service_tags = list(svc.tags)
        return True

    def _put_check(self, check: Check, index: int) -> None:
        key = (check.node, check.check_id)
        old = self._checks.get(key)
        check.create_index = old.create_index if old else index
        check.modify_index = index
        if check.status == CRITICAL:
            check.critical_since = old.critical_since if old and old.critical_since else time.monotonic()
        else:
            check.critical_since = None
        self._checks[key] = check
        self._tables["checks"] = index
        self._touch_check_services(check, index)

    def _touch_check_services(self, check: Check, index: int) -> None:
        if check.service_id:
            svc = self._services.get((check.node, check.service_id))
            if svc:
                self._touch_service(svc.name, index)
        else:
            self._touch_node_services(check.node, index)

    def _delete_check(self, key: tuple[str, str], index: int) -> None:
        check = self._checks.pop(key, None)
        if check is None:
            return
        self._stop_runner(check)
        self._tables["checks"] = index
        self._touch_check_services(check, index)

    def _delete_service(self, key: tuple[str, str], index: int) -> None:
        svc = self._services.pop(key, None)
        if svc is None:
            return
        for check_key, check in list(self._checks.items()):
            if check.node == svc.node and check.service_id == svc.id:
                self._delete_check(check_key, index)
        self._tables["services"] = index
        self._touch_service(svc.name, index)

    def _set_status(self, check: Check, status: str, output: str) -> None:
        """A check result: writes (and bumps indexes) only when status or output changed."""
        if check.status == status and check.output == output:
            return
        key = (check.node, check.check_id)
        if self._checks.get(key) is not check:
            return
        check.status = status
        check.output = output
        index = self._next_index()
        self._put_check(check, index)
        self._notify()

    def local_services(self) -> dict[str, Service]:
        return {s.id: s for s in self._services.values() if s.local and s.node == self.node_name}

    def local_checks(self) -> dict[str, Check]:
        return {c.check_id: c for c in self._checks.values() if c.local and c.node == self.node_name}

    def node_checks(self, node: str) -> list[Check]:
        return sorted(
            (c for c in self._checks.values() if c.node == node and not c.service_id),
            key=lambda c: c.check_id,
        )

    def service_checks(self, svc: Service) -> list[Check]:
        return sorted(
            (c for c in self._checks.values() if c.node == svc.node and c.service_id == svc.id),
            key=lambda c: c.check_id,
        )

    def instances(self, name: str) -> list[Service]:
        return sorted((s for s in self._services.values() if s.name == name), key=lambda s: (s.node, s.id))

    def service_entry(self, svc: Service) -> dict[str, Any]:
        checks = self.node_checks(svc.node) + self.service_checks(svc)
        return {
            "Node": self._nodes[svc.node].to_json(),
            "Service": svc.catalog_json(),
            "Checks": [c.to_json() for c in checks],
        }

    # Plain views for test code (no ACLs, no faults).

    def services_view(self) -> dict[str, Any]:
        return {sid: svc.agent_json(self.datacenter) for sid, svc in sorted(self.local_services().items())}

    def checks_view(self) -> dict[str, Any]:
        return {cid: c.to_json(agent_view=True) for cid, c in sorted(self.local_checks().items())}

    def health_view(self, name: str, passing: bool = False) -> list[dict[str, Any]]:
        entries = [self.service_entry(s) for s in self.instances(name)]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        return entries

    def kv_view(self) -> dict[str, bytes]:
        return {k: e.value for k, e in sorted(self._kv.items())}

    # -- check housekeeping (the runners are started in checks.py) -------------------------------

    @staticmethod
    def _stop_runner(check: Check) -> None:
        if check.runner is not None:
            check.runner.cancel()
            check.runner = None

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for check in list(self.local_checks().values()):
                spec = check.spec
                if not (spec and spec.deregister_after and check.service_id):
                    continue
                if check.status == CRITICAL and check.critical_since is not None:
                    if now - check.critical_since >= spec.deregister_after:
                        self.deregister_service(check.service_id)

    # -- agent operations (shared by HTTP handlers and tests) ------------------------------------

    def deregister_service(self, service_id: str) -> bool:
        svc = self.local_services().get(service_id)
        if svc is None:
            return False
        index = self._next_index()
        for sidecar in [s for s in self.local_services().values() if s.sidecar_of == service_id]:
            self._delete_service((sidecar.node, sidecar.id), index)
        self._delete_service((svc.node, svc.id), index)
        self._notify()
        return True

    # -- HTTP plumbing ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        """The route table. Each area mixin extends it: ``return [*super().routes(), Route(...)]``."""
        return []

    def _build_routes(self) -> tuple[dict[str, Route], list[Route]]:
        exact: dict[str, Route] = {}
        prefixes: list[Route] = []
        for route in self.routes():
            taken = {r.path for r in prefixes} if route.prefix else exact.keys()
            if route.path in taken:
                raise ValueError(f"two routes for {route.path!r}")
            if route.prefix:
                prefixes.append(route)
            else:
                exact[route.path] = route
        # The longest matching prefix wins ("/v1/agent/service/deregister/" over "/v1/agent/service/").
        prefixes.sort(key=lambda r: len(r.path), reverse=True)
        return exact, prefixes

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.fault == "hang":
            while self.fault == "hang":
                await self._fault_changed.wait()
        if self.fault == "error500":
            return _text(500, ERROR500_BODY)
        exact, prefixes = self._routes
        path = request.path
        route = exact.get(path)
        rest = ""
        if route is None:
            for candidate in prefixes:
                if path.startswith(candidate.path):
                    route, rest = candidate, path[len(candidate.path) :]
                    break
        if route is None:
            return _text(404, "404 page not found\n")
        _, methods, handler, _ = route
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": ",".join((*methods, "OPTIONS"))})
        if request.method not in methods:
            return _text(405, f"method {request.method} not allowed")
        try:
            return await handler(request, rest)
        except ConsulError as exc:
            return _text(exc.status, exc.text)

    def _authz(self, request: web.BaseRequest) -> tuple[Authz, str]:
        secret = request.query.get("token", "") or request.headers.get("X-Consul-Token", "")
        if not secret:
            parts = request.headers.get("Authorization", "").split(" ")
            if len(parts) > 1 and parts[0] == "Bearer":
                secret = " ".join(parts[1:]).strip().split(" ")[0]
        if not self.acl_enabled:
            return Authz(False, None), secret
        if not secret or secret == "anonymous":
            return Authz(True, None), ""
        token = self.tokens.get(secret)
        if token is None:
            raise ConsulError(403, "ACL not found")
        return Authz(True, token), secret

    def _check_dc(self, dc: str | None) -> None:
        if dc and dc != self.datacenter:
            raise ConsulError(500, "No path to datacenter")

    async def _body(self, request: web.BaseRequest, *, required: bool = True) -> Any:
        raw = await request.read()
        if not raw.strip():
            if required:
                raise ConsulError(400, "Request decode failed: EOF")
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConsulError(400, f"Request decode failed: {exc}") from None

    def _filter(self, request: web.BaseRequest, *, agent_local: bool = False) -> Filter | None:
        text = request.query.get("filter", "")
        if not text:
            return None
        try:
            return Filter(text)
        except FilterError as exc:
            if agent_local:
                raise ConsulError(500, f"Failed to create boolean expression evaluator: {exc}") from None
            raise ConsulError(400, f"Failed to create boolean expression evaluator: {exc}") from None

    def _meta_headers(self, index: int, filtered: bool = False, token: str = "") -> dict[str, str]:
        headers = {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": "leader",
        }
        headers["X-Consul-Default-ACL-Policy"] = self.acl_default_policy
        if token and filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return headers

    async def _query(
        self, request: web.BaseRequest, compute: Callable[[], Result], token: str = ""
    ) -> web.StreamResponse:
        """Run a read endpoint as a Consul blocking query (``?index=`` + ``?wait=``)."""
        query = request.query
        if "stale" in query and "consistent" in query:
            raise ConsulError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        wait = DEFAULT_WAIT
        if query.get("wait"):
            try:
                wait = parse_duration(query["wait"])
            except ValueError:
                raise ConsulError(400, "Invalid wait time") from None
        min_index = 0
        if query.get("index"):
            try:
                min_index = int(query["index"])
                if min_index < 0:
                    raise ValueError
            except ValueError:
                raise ConsulError(400, "Invalid index") from None
        wait = min(max(wait, 0.0), MAX_WAIT) or DEFAULT_WAIT
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        epoch = self._epoch
        seen_empty = False
        while True:
            changed = self._changed
            result = compute()
            if min_index == 0 or self._epoch != epoch:
                break
            if result.empty:
                if seen_empty:
                    min_index = max(min_index, result.index)
                seen_empty = True
            if result.index > min_index:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                result = compute()
                break
        headers = self._meta_headers(result.index, result.filtered, token)
        headers.update(result.headers)
        if result.raw is not None:
            return web.Response(status=result.status, body=result.raw, headers=headers)
        if result.status == 404:
            return web.Response(status=404, headers=headers)
        return _json(result.data, headers=headers, status=result.status)

    # -- lookups shared by catalog and health -----------------------------------------------------

    def _node_meta_ok(self, request: web.BaseRequest, node: Node) -> bool:
        for pair in request.query.getall("node-meta", []):
            key, _, value = pair.partition(":")
            if (node.meta or {}).get(key) != value:
                return False
        return True

    def _tags_ok(self, request: web.BaseRequest, svc: Service) -> bool:
        lowered = {t.lower() for t in svc.tags}
        return all(tag.lower() in lowered for tag in request.query.getall("tag", []))

    def _service_index_for(self, name: str, with_checks: bool) -> int:
        if any(s.name == name for s in self._services.values()):
            return self._service_index.get(name, self._tables["services"])
        tables = ["nodes", "services"] + (["checks"] if with_checks else [])
        return max(self._tables[t] for t in tables)

    def _connect_instances(self, name: str) -> list[Service]:
        out = []
        for svc in sorted(self._services.values(), key=lambda s: (s.node, s.id)):
            if svc.kind == "connect-proxy" and (svc.proxy or {}).get("DestinationServiceName") == name:
                out.append(svc)
            elif svc.name == name and svc.connect.get("Native"):
                out.append(svc)
        return out
