"""The Agent API, ``/v1/agent``: the local agent's services and checks, and the agent itself.

Services (register with checks and a Connect sidecar, deregister, maintenance, local health by
ID and by name, a service's definition with hash-based blocking), checks (register, deregister,
TTL pass/warn/fail/update, node maintenance), and the agent: self, members, reload, leave,
force-leave, metrics, monitor, host and its ACL tokens. A local service or check is the node's
catalog entry at once (anti-entropy is instantaneous).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .checks import CheckRunners
from .core import DEFAULT_WAIT, MAX_WAIT, Authz, Route
from .model import Check, CheckSpec, Service, _default_proxy
from .protocol import (
    CRITICAL,
    PASSING,
    SERVER_ADDR,
    STATUSES,
    VERSION,
    WARNING,
    ConsulError,
    Fields,
    _canon,
    _decode_error,
    _empty,
    _json,
    _parse_go_bool,
    _text,
    parse_duration,
)

SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT_ID = "_node_maintenance"
DEFAULT_SERVICE_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
DEFAULT_NODE_MAINT_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "err", "error", "off")
AGENT_TOKEN_TYPES = (
    "default",
    "agent",
    "agent_recovery",
    "agent_master",
    "replication",
    "acl_token",
    "acl_agent_token",
    "acl_agent_master_token",
    "acl_replication_token",
    "config_file_service_registration",
    "dns",
)


class AgentAPI(CheckRunners):
    """The ``/v1/agent`` endpoints, and registering a local service with its checks and sidecar."""

    def _member(self, wan: bool = False) -> dict[str, Any]:
        return {
            "Name": f"{self.node_name}.{self.datacenter}" if wan else self.node_name,
            "Addr": "127.0.0.1",
            "Port": 8302 if wan else 8301,
            "Tags": {
                "acls": "1" if self.acl_enabled else "0",
                "build": f"{VERSION}:00000000",
                "dc": self.datacenter,
                "ft_fs": "1",
                "ft_si": "1",
                "grpc_port": "8502",
                "id": self.node_id,
                "port": "8300",
                "raft_vsn": "3",
                "role": "consul",
                "segment": "",
                "vsn": "2",
                "vsn_max": "3",
                "vsn_min": "2",
                "wan_join_port": "8302",
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    async def h_agent_self(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "read", self.node_name)
        body = {
            "Config": {
                "Datacenter": self.datacenter,
                "PrimaryDatacenter": self.datacenter,
                "NodeName": self.node_name,
                "NodeID": self.node_id,
                "Revision": "00000000",
                "Server": True,
                "Version": VERSION,
                "BuildDate": "2025-01-01T00:00:00Z",
            },
            "DebugConfig": {
                "ACLResolverSettings": {
                    "ACLDefaultPolicy": self.acl_default_policy,
                    "ACLDownPolicy": "extend-cache",
                    "ACLsEnabled": self.acl_enabled,
                    "Datacenter": self.datacenter,
                    "EnterpriseMeta": {},
                    "NodeName": self.node_name,
                },
                "ACLsEnabled": self.acl_enabled,
                "ConnectEnabled": True,
                "Datacenter": self.datacenter,
                "DefaultIntentionPolicy": self.default_intention_policy,
                "DevMode": True,
                "EnableScriptChecks": self.enable_script_checks,
                "NodeName": self.node_name,
                "ServerMode": True,
                "Version": VERSION,
            },
            "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
            "Member": self._member(),
            "Stats": {
                "agent": {
                    "check_monitors": "0",
                    "check_ttls": str(sum(1 for c in self.local_checks().values() if c.type == "ttl")),
                    "checks": str(len(self.local_checks())),
                    "services": str(len(self.local_services())),
                },
                "build": {"prerelease": "", "revision": "00000000", "version": VERSION},
                "consul": {
                    "acl": "enabled" if self.acl_enabled else "disabled",
                    "bootstrap": "true",
                    "known_datacenters": "1",
                    "leader": "true",
                    "leader_addr": SERVER_ADDR,
                    "server": "true",
                },
                "raft": {
                    "applied_index": str(self._index),
                    "commit_index": str(self._index),
                    "state": "Leader",
                },
                "runtime": {"arch": "amd64", "os": "linux", "version": "go1.23"},
                "serf_lan": {"members": "1"},
                "serf_wan": {"members": "1"},
            },
            "Meta": {"consul-network-segment": "", "consul-version": VERSION},
            "xDS": {
                "SupportedProxies": {"envoy": ["1.33.0", "1.32.3"]},
                "Port": 8502,
                "Ports": {"Plaintext": 8502, "TLS": -1},
            },
        }
        return _json(body)

    async def h_agent_members(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        wan = bool(request.query.get("wan"))
        if wan and request.query.get("segment", "") not in ("", "_all"):
            raise ConsulError(400, "Cannot provide a segment with wan=true")
        members = [self._member(wan)]
        visible = [m for m in members if authz.allowed("node", "read", self.node_name)]
        headers = {}
        if secret and len(visible) != len(members):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return _json(visible, headers=headers)

    async def h_agent_services(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        filt = self._filter(request, agent_local=True)
        services = self.services_view()
        if filt:
            services = {k: v for k, v in services.items() if filt.matches(v)}
        visible = {k: v for k, v in services.items() if authz.can_read_service(v["Service"])}
        headers = {}
        if secret and len(visible) != len(services):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return _json(visible, headers=headers)

    async def h_agent_service(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        wait = DEFAULT_WAIT
        if request.query.get("wait"):
            try:
                wait = min(parse_duration(request.query["wait"]), MAX_WAIT)
            except ValueError:
                raise ConsulError(400, "Invalid wait time") from None
        want = request.query.get("hash", "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        while True:
            changed = self._changed
            svc = self.local_services().get(service_id)
            if svc is None:
                raise ConsulError(404, f"unknown service ID: {service_id}")
            authz.require("service", "read", svc.name)
            body = svc.agent_json(self.datacenter)
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
            body["ContentHash"] = digest
            remaining = deadline - loop.time()
            if not want or want != digest or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return _json(body, headers={"X-Consul-ContentHash": digest})

    async def h_agent_checks(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        filt = self._filter(request, agent_local=True)
        checks = self.checks_view()
        if filt:
            checks = {k: v for k, v in checks.items() if filt.matches(v)}
        visible = {
            k: v
            for k, v in checks.items()
            if (
                authz.can_read_service(v["ServiceName"]) if v["ServiceID"] else authz.can_read_node(v["Node"])
            )
        }
        headers = {}
        if secret and len(visible) != len(checks):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return _json(visible, headers=headers)

    def _parse_service(self, raw: Any) -> tuple[Service, list[CheckSpec], dict[str, Any] | None]:
        f = Fields(raw, "ServiceDefinition")
        name = f.text("Name")
        if not name:
            raise ConsulError(400, "Missing service name")
        address = f.text("Address")
        if address in ("0.0.0.0", "::", "[::]"):
            raise ConsulError(400, "Invalid service address")
        tagged: dict[str, dict[str, Any]] = {}
        raw_tagged = f.get("TaggedAddresses") or {}
        if not isinstance(raw_tagged, dict):
            raise _decode_error(
                "ServiceDefinition.TaggedAddresses", "map[string]structs.ServiceAddress", raw_tagged
            )
        for tag, value in raw_tagged.items():
            tf = Fields(value, f"ServiceDefinition.TaggedAddresses[{tag}]")
            tagged[tag] = {"Address": tf.text("Address"), "Port": tf.integer("Port")}
        weights = {"Passing": 1, "Warning": 1}
        if f.get("Weights") is not None:
            wf = Fields(f.get("Weights"), "ServiceDefinition.Weights")
            weights = {"Passing": wf.integer("Passing"), "Warning": wf.integer("Warning")}
            if weights["Passing"] <= 0:
                raise ConsulError(400, "Invalid Weights: Passing must be greater than 0")
        meta = f.str_map("Meta")
        _validate_meta(meta)
        kind = f.text("Kind")
        proxy = None
        if f.get("Proxy") is not None or kind:
            pf = Fields(f.get("Proxy"), "ServiceDefinition.Proxy")
            proxy = _default_proxy()
            proxy.update(
                {
                    "DestinationServiceName": pf.text("DestinationServiceName"),
                    "DestinationServiceID": pf.text("DestinationServiceID"),
                    "LocalServiceAddress": pf.text("LocalServiceAddress"),
                    "LocalServicePort": pf.integer("LocalServicePort"),
                }
            )
            for key, value in pf.raw.items():
                if _canon(key) not in {_canon(k) for k in proxy}:
                    proxy[key] = value
            proxy = {k: v for k, v in proxy.items() if v not in ("", 0) or k in ("Mode",)}
        connect_raw = f.get("Connect")
        connect: dict[str, Any] = {}
        sidecar: dict[str, Any] | None = None
        if connect_raw is not None:
            cf = Fields(connect_raw, "ServiceDefinition.Connect")
            if cf.flag("Native"):
                connect["Native"] = True
            if cf.get("SidecarService") is not None:
                sidecar = cf.get("SidecarService")
                if not isinstance(sidecar, dict):
                    raise _decode_error(
                        "ServiceDefinition.Connect.SidecarService", "structs.ServiceDefinition", sidecar
                    )
        locality = None
        if f.get("Locality") is not None:
            lf = Fields(f.get("Locality"), "ServiceDefinition.Locality")
            locality = {"Region": lf.text("Region"), "Zone": lf.text("Zone")}
        svc = Service(
            node=self.node_name,
            id=f.text("ID") or name,
            name=name,
            tags=f.str_list("Tags"),
            address=address,
            port=f.integer("Port"),
            meta=meta,
            weights=weights,
            enable_tag_override=f.flag("EnableTagOverride"),
            tagged_addresses=tagged,
            kind=kind,
            proxy=proxy,
            connect=connect,
            locality=locality,
            socket_path=f.text("SocketPath"),
            local=True,
        )
        if kind == "connect-proxy":
            if not svc.port and not svc.socket_path:
                raise ConsulError(
                    400, "Validation failed: Port or SocketPath must be set for a connect-proxy"
                )
            if not (proxy or {}).get("DestinationServiceName"):
                raise ConsulError(400, "Validation failed: Proxy.DestinationServiceName must be set")
        specs: list[CheckSpec] = []
        raw_checks: list[Any] = []
        if f.get("Check") is not None:
            raw_checks.append(f.get("Check"))
        extra = f.get("Checks")
        if extra is not None:
            if not isinstance(extra, list):
                raise _decode_error("ServiceDefinition.Checks", "structs.CheckTypes", extra)
            raw_checks.extend(extra)
        for i, raw_check in enumerate(raw_checks):
            spec = CheckSpec.parse(raw_check, f"ServiceDefinition.Checks[{i}]")
            if spec.empty():
                continue
            try:
                spec.validate()
            except ValueError as exc:
                if "Status for checks" in str(exc):
                    raise ConsulError(400, str(exc)) from None
                raise ConsulError(400, f"Invalid check: {exc}") from None
            specs.append(spec)
        return svc, specs, sidecar

    async def h_service_register(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        authz, _secret = self._authz(request)
        svc, specs, sidecar_raw = self._parse_service(raw)
        authz.require("service", "write", svc.name)
        existing = self.local_services().get(svc.id)
        if existing is not None and existing.name != svc.name:
            authz.require("service", "write", existing.name)
        if any(s.script_args for s in specs) and not self.enable_script_checks:
            raise ConsulError(
                500, "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' to true"
            )
        sidecar = None
        if sidecar_raw is not None:
            sidecar = self._sidecar_for(svc, sidecar_raw)
            authz.require("service", "write", sidecar[0].name)
        replace = request.query.get("replace-existing-checks")
        self.register_service(
            svc,
            specs,
            replace_existing_checks="replace-existing-checks" in request.query and replace in ("", "true"),
        )
        if sidecar is not None:
            self.register_service(sidecar[0], sidecar[1], replace_existing_checks=False)
        return _empty()

    def _sidecar_for(self, parent: Service, raw: dict[str, Any]) -> tuple[Service, list[CheckSpec]]:
        defaults = {"Name": f"{parent.name}-sidecar-proxy", "ID": f"{parent.id}-sidecar-proxy"}
        merged = {**defaults, **{k: v for k, v in raw.items()}}
        f = Fields(merged, "SidecarService")
        port = f.integer("Port")
        if not port:
            used = {s.port for s in self._services.values() if s.node == self.node_name}
            port = next(p for p in range(21000, 21256) if p not in used)
        merged.setdefault("Kind", "connect-proxy")
        merged["Port"] = port
        proxy = dict(Fields(merged.get("Proxy"), "Proxy").raw)
        proxy.setdefault("DestinationServiceName", parent.name)
        proxy.setdefault("DestinationServiceID", parent.id)
        proxy.setdefault("LocalServiceAddress", "127.0.0.1")
        if parent.port:
            proxy.setdefault("LocalServicePort", parent.port)
        merged["Proxy"] = proxy
        if not f.has("Tags"):
            merged["Tags"] = list(parent.tags)
        if not f.has("Meta"):
            merged["Meta"] = dict(parent.meta)
        svc, specs, _ = self._parse_service(merged)
        svc.sidecar_of = parent.id
        if not specs:
            specs = [
                CheckSpec(name="Connect Sidecar Listening", tcp=f"127.0.0.1:{port}", interval=10.0),
                CheckSpec(name="Connect Sidecar Aliasing " + parent.id, alias_service=parent.id),
            ]
        return svc, specs

    def register_service(
        self, svc: Service, specs: list[CheckSpec], *, replace_existing_checks: bool = False
    ) -> None:
        index = self._next_index()
        self._put_service(svc, index)
        wanted: set[str] = set()
        for i, spec in enumerate(specs):
            check_id = spec.check_id
            if not check_id:
                check_id = f"service:{svc.id}"
                if len(specs) > 1:
                    check_id += f":{i + 1}"
            wanted.add(check_id)
            check = Check(
                node=self.node_name,
                check_id=check_id,
                name=spec.name or f"Service '{svc.name}' check",
                status=spec.status or CRITICAL,
                notes=spec.notes,
                service_id=svc.id,
                service_name=svc.name,
                service_tags=list(svc.tags),
                type=spec.kind,
                spec=spec,
                local=True,
            )
            self._add_check(check, index)
        if replace_existing_checks:
            for key, check in list(self._checks.items()):
                if (
                    check.node == self.node_name
                    and check.service_id == svc.id
                    and check.check_id not in wanted
                    and not check.check_id.startswith(SERVICE_MAINT_PREFIX)
                ):
                    self._delete_check(key, index)
        self._notify()

    def _add_check(self, check: Check, index: int) -> None:
        """Add or replace a local check, keeping the status and output of one it replaces."""
        key = (check.node, check.check_id)
        old = self._checks.get(key)
        if old is not None:
            self._stop_runner(old)
            check.status, check.output = old.status, old.output
            check.last_output = old.last_output
        self._put_check(check, index)
        self._start_runner(check)

    async def h_service_deregister(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        svc = self.local_services().get(service_id)
        if svc is None:
            raise ConsulError(
                404,
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name.",
            )
        authz.require("service", "write", svc.name)
        self.deregister_service(service_id)
        return _empty()

    def _enable_param(self, request: web.BaseRequest) -> bool:
        if "enable" not in request.query:
            raise ConsulError(400, "Missing value for enable")
        raw = request.query["enable"]
        value = _parse_go_bool(raw)
        if value is None:
            raise ConsulError(400, f'Invalid value for enable: "{raw}"')
        return value

    async def h_service_maintenance(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        if not service_id:
            raise ConsulError(400, "Missing service ID")
        enable = self._enable_param(request)
        authz, _secret = self._authz(request)
        svc = self.local_services().get(service_id)
        if svc is None:
            raise ConsulError(404, f'No service registered with ID "{service_id}"')
        authz.require("service", "write", svc.name)
        check_id = SERVICE_MAINT_PREFIX + service_id
        key = (self.node_name, check_id)
        if enable and key not in self._checks:
            check = Check(
                node=self.node_name,
                check_id=check_id,
                name="Service Maintenance Mode",
                status=CRITICAL,
                notes=request.query.get("reason") or DEFAULT_SERVICE_MAINT_REASON,
                service_id=svc.id,
                service_name=svc.name,
                service_tags=list(svc.tags),
                type="maintenance",
                local=True,
            )
            self._put_check(check, self._next_index())
            self._notify()
        elif not enable and key in self._checks:
            self._delete_check(key, self._next_index())
            self._notify()
        return _empty()

    async def h_node_maintenance(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        enable = self._enable_param(request)
        authz, _secret = self._authz(request)
        authz.require("node", "write", self.node_name)
        key = (self.node_name, NODE_MAINT_ID)
        if enable and key not in self._checks:
            check = Check(
                node=self.node_name,
                check_id=NODE_MAINT_ID,
                name="Node Maintenance Mode",
                status=CRITICAL,
                notes=request.query.get("reason") or DEFAULT_NODE_MAINT_REASON,
                type="maintenance",
                local=True,
            )
            self._put_check(check, self._next_index())
            self._notify()
        elif not enable and key in self._checks:
            self._delete_check(key, self._next_index())
            self._notify()
        return _empty()

    async def h_check_register(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        spec = CheckSpec.parse(raw, "CheckDefinition")
        if not spec.name:
            raise ConsulError(400, "Missing check name")
        if spec.status and spec.status not in STATUSES:
            raise ConsulError(400, "Bad check status")
        authz, _secret = self._authz(request)
        try:
            spec.validate()
        except ValueError as exc:
            raise ConsulError(400, f"Invalid check: {exc}") from None
        svc = None
        if spec.service_id:
            svc = self.local_services().get(spec.service_id)
            if svc is None:
                raise ConsulError(404, f'ServiceID "{spec.service_id}" does not exist')
            authz.require("service", "write", svc.name)
        else:
            authz.require("node", "write", self.node_name)
        if spec.script_args and not self.enable_script_checks:
            raise ConsulError(
                500, "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' to true"
            )
        check = Check(
            node=self.node_name,
            check_id=spec.check_id or spec.name,
            name=spec.name,
            status=spec.status or CRITICAL,
            notes=spec.notes,
            service_id=svc.id if svc else "",
            service_name=svc.name if svc else "",
            service_tags=list(svc.tags) if svc else [],
            type=spec.kind,
            spec=spec,
            local=True,
        )
        self._add_check(check, self._next_index())
        self._notify()
        return _empty()

    def _vet_check_update(self, authz: Authz, check_id: str) -> Check:
        check = self.local_checks().get(check_id)
        if check is None:
            raise ConsulError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if check.service_id:
            authz.require("service", "write", check.service_name)
        else:
            authz.require("node", "write", self.node_name)
        return check

    async def h_check_deregister(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        check = self._vet_check_update(authz, check_id)
        self._delete_check((check.node, check.check_id), self._next_index())
        self._notify()
        return _empty()

    async def _ttl_update(
        self, request: web.BaseRequest, check_id: str, status: str, output: str
    ) -> web.Response:
        authz, _secret = self._authz(request)
        self._vet_check_update(authz, check_id)
        self.update_ttl(check_id, status, output)
        return _empty()

    async def h_check_pass(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        return await self._ttl_update(request, check_id, PASSING, request.query.get("note", ""))

    async def h_check_warn(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        return await self._ttl_update(request, check_id, WARNING, request.query.get("note", ""))

    async def h_check_fail(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        return await self._ttl_update(request, check_id, CRITICAL, request.query.get("note", ""))

    async def h_check_update(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        f = Fields(await self._body(request), "checkUpdate")
        status = f.text("Status")
        if status not in STATUSES:
            raise ConsulError(400, f"Invalid check status: '{status}'")
        return await self._ttl_update(request, check_id, status, f.text("Output"))

    def _agent_health(self, svc: Service) -> tuple[int, str, dict[str, Any]]:
        checks = [c.to_json(agent_view=True) for c in self.service_checks(svc)]
        statuses = {c["Status"] for c in checks}
        status = CRITICAL if CRITICAL in statuses else WARNING if WARNING in statuses else PASSING
        code = {PASSING: 200, WARNING: 429, CRITICAL: 503}[status]
        info = {"AggregatedStatus": status, "Service": svc.agent_json(self.datacenter), "Checks": checks}
        return code, status, info

    async def h_agent_health_id(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        if not service_id:
            raise ConsulError(400, "Missing serviceID")
        authz, _secret = self._authz(request)
        text = (
            request.headers.get("Accept", "").startswith("text/plain")
            or request.query.get("format") == "text"
        )
        svc = self.local_services().get(service_id)
        if svc is None:
            reason = f"ServiceId {service_id} not found"
            if text:
                return _text(404, reason)
            return _json({"AggregatedStatus": CRITICAL, "Service": None, "Checks": None}, status=404)
        authz.require("service", "read", svc.name)
        code, status, info = self._agent_health(svc)
        if text:
            return _text(code, status)
        return _json(info, status=code)

    async def h_agent_health_name(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        if not name:
            raise ConsulError(400, "Missing service Name")
        authz, _secret = self._authz(request)
        authz.require("service", "read", name)
        code, status, infos = 404, f"ServiceName {name} Not Found", []
        for svc in sorted(self.local_services().values(), key=lambda s: s.id):
            if svc.name != name:
                continue
            scode, sstatus, info = self._agent_health(svc)
            infos.append(info)
            if code == 404 or scode > code:
                code, status = scode, sstatus
        if (
            request.headers.get("Accept", "").startswith("text/plain")
            or request.query.get("format") == "text"
        ):
            return _text(code, status)
        return _json(infos, status=code)

    async def h_agent_reload(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "write", self.node_name)
        return _empty()

    async def h_agent_leave(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "write", self.node_name)

        async def leave() -> None:
            await asyncio.sleep(0.05)
            self.left.set()
            self.fault = "refuse"
            if self._listener:
                await self._listener.close()

        task = asyncio.get_running_loop().create_task(leave())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return _empty()

    async def h_force_leave(self, request: web.BaseRequest, node: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("operator", "write")
        if node != self.node_name:
            raise ConsulError(500, f"agent: No node found with name '{node}'")
        return _empty()

    async def h_agent_metrics(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "read", self.node_name)
        accept = request.headers.get("Accept", "")
        if request.query.get("format") == "prometheus" or "openmetrics" in accept:
            # Consul without telemetry.prometheus_retention_time: an empty 200 and a reason header.
            return web.Response(
                status=200,
                headers={
                    "X-Consul-Reason": "Prometheus is not enabled since its retention time is not positive"
                },
            )
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
        gauges = [
            {"Name": "consul.runtime.num_goroutines", "Value": 100.0, "Labels": {}},
            {"Name": "consul.catalog.services", "Value": float(len(self._services)), "Labels": {}},
        ]
        return _json({"Timestamp": now, "Gauges": gauges, "Points": [], "Counters": [], "Samples": []})

    async def h_agent_monitor(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "read", self.node_name)
        level = request.query.get("loglevel", "info")
        if level.lower() not in LOG_LEVELS:
            raise ConsulError(400, f"Unknown log level: {level}")
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)  # type: ignore[arg-type]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        await response.write(f"{stamp} [INFO]  agent: consul test agent monitor attached\n".encode())
        await self.left.wait()
        return response

    async def h_agent_host(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("operator", "read")
        return _json({"Host": {"hostname": self.node_name, "os": "linux"}, "CollectionTime": time.time_ns()})

    async def h_agent_token(self, request: web.BaseRequest, kind: str) -> web.StreamResponse:
        if not self.acl_enabled:
            raise ConsulError(401, "ACL support disabled")
        authz, _secret = self._authz(request)
        authz.require("acl", "write")
        if kind not in AGENT_TOKEN_TYPES:
            raise ConsulError(404, f'Token "{kind}" is unknown')
        f = Fields(await self._body(request), "AgentToken")
        self.agent_tokens[kind] = f.text("Token")
        return _empty()

    def routes(self) -> list[Route]:
        return [
            *super().routes(),
            Route("/v1/agent/self", ("GET",), self.h_agent_self),
            Route("/v1/agent/members", ("GET",), self.h_agent_members),
            Route("/v1/agent/services", ("GET",), self.h_agent_services),
            Route("/v1/agent/checks", ("GET",), self.h_agent_checks),
            Route("/v1/agent/service/register", ("PUT",), self.h_service_register),
            Route("/v1/agent/check/register", ("PUT",), self.h_check_register),
            Route("/v1/agent/maintenance", ("PUT",), self.h_node_maintenance),
            Route("/v1/agent/reload", ("PUT",), self.h_agent_reload),
            Route("/v1/agent/leave", ("PUT",), self.h_agent_leave),
            Route("/v1/agent/metrics", ("GET",), self.h_agent_metrics),
            Route("/v1/agent/monitor", ("GET",), self.h_agent_monitor),
            Route("/v1/agent/host", ("GET",), self.h_agent_host),
            Route("/v1/agent/service/deregister/", ("PUT",), self.h_service_deregister, prefix=True),
            Route("/v1/agent/service/maintenance/", ("PUT",), self.h_service_maintenance, prefix=True),
            Route("/v1/agent/service/", ("GET",), self.h_agent_service, prefix=True),
            Route("/v1/agent/check/deregister/", ("PUT",), self.h_check_deregister, prefix=True),
            Route("/v1/agent/check/pass/", ("PUT",), self.h_check_pass, prefix=True),
            Route("/v1/agent/check/warn/", ("PUT",), self.h_check_warn, prefix=True),
            Route("/v1/agent/check/fail/", ("PUT",), self.h_check_fail, prefix=True),
            Route("/v1/agent/check/update/", ("PUT",), self.h_check_update, prefix=True),
            Route("/v1/agent/health/service/id/", ("GET",), self.h_agent_health_id, prefix=True),
            Route("/v1/agent/health/service/name/", ("GET",), self.h_agent_health_name, prefix=True),
            Route("/v1/agent/force-leave/", ("PUT",), self.h_force_leave, prefix=True),
            Route("/v1/agent/token/", ("PUT",), self.h_agent_token, prefix=True),
        ]


def _validate_meta(meta: dict[str, str]) -> None:
    if len(meta) > 64:
        raise ConsulError(
            400, "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        if not key:
            raise ConsulError(400, "Invalid Service Meta: Key cannot be blank")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ConsulError(
                400,
                f"Invalid Service Meta: Key contains invalid characters. Valid characters include all "
                f"alpha-numerics and dashes: {key!r}",
            )
        if len(key) > 128:
            raise ConsulError(400, f"Invalid Service Meta: Key is too long (limit: 128 characters): {key!r}")
        if key.startswith("consul-"):
            raise ConsulError(
                400, f"Invalid Service Meta: Key prefix 'consul-' is reserved for internal use: {key!r}"
            )
        if len(value) > 512:
            raise ConsulError(
                400, f"Invalid Service Meta: Value is too long (limit: 512 characters): {key!r}"
            )
