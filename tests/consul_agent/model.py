"""The records the agent keeps: catalog nodes, services, checks (and what a check does), KV entries.

Each record renders itself the way Consul's endpoints show it (``to_json``, ``agent_json``,
``catalog_json``, ``service_node_json``); the state store that holds them is in core.py.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from .protocol import CRITICAL, DATACENTER, STATUSES, Fields, _decode_error, format_duration

OUTPUT_MAX = 4096


@dataclass
class Node:
    id: str
    name: str
    address: str
    datacenter: str = DATACENTER
    tagged_addresses: dict[str, str] | None = None
    meta: dict[str, str] | None = None
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": self.tagged_addresses,
            "Meta": self.meta,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def _default_proxy() -> dict[str, Any]:
    return {"Mode": "", "MeshGateway": {}, "Expose": {}}


@dataclass
class Service:
    node: str
    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str = ""
    proxy: dict[str, Any] | None = None
    connect: dict[str, Any] = field(default_factory=dict)
    locality: dict[str, str] | None = None
    socket_path: str = ""
    local: bool = False  # registered through the agent API (shown by /v1/agent/services)
    sidecar_of: str = ""
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: Service) -> bool:
        mine = dict(self.__dict__, create_index=0, modify_index=0)
        theirs = dict(other.__dict__, create_index=0, modify_index=0)
        return mine == theirs

    def agent_json(self, datacenter: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind:
            out["Kind"] = self.kind
        out.update(
            {
                "ID": self.id,
                "Service": self.name,
                "Tags": list(self.tags),
                "Meta": dict(self.meta),
                "Port": self.port,
                "Address": self.address,
            }
        )
        if self.socket_path:
            out["SocketPath"] = self.socket_path
        if self.tagged_addresses:
            out["TaggedAddresses"] = {k: dict(v) for k, v in self.tagged_addresses.items()}
        out["Weights"] = dict(self.weights)
        out["EnableTagOverride"] = self.enable_tag_override
        if self.kind and self.proxy is not None:
            out["Proxy"] = dict(self.proxy)
        if self.connect.get("Native"):
            out["Connect"] = {"Native": True}
        out["Datacenter"] = datacenter
        if self.locality:
            out["Locality"] = dict(self.locality)
        return out

    def catalog_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind:
            out["Kind"] = self.kind
        out.update(
            {
                "ID": self.id,
                "Service": self.name,
                "Tags": list(self.tags),
                "Address": self.address,
            }
        )
        if self.tagged_addresses:
            out["TaggedAddresses"] = {k: dict(v) for k, v in self.tagged_addresses.items()}
        out.update(
            {
                "Meta": dict(self.meta),
                "Port": self.port,
                "Weights": dict(self.weights),
                "EnableTagOverride": self.enable_tag_override,
                "Proxy": dict(self.proxy) if self.proxy is not None else _default_proxy(),
                "Connect": dict(self.connect),
            }
        )
        if self.socket_path:
            out["SocketPath"] = self.socket_path
        if self.locality:
            out["Locality"] = dict(self.locality)
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def service_node_json(self, node: Node) -> dict[str, Any]:
        out = {
            "ID": node.id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": node.datacenter,
            "TaggedAddresses": node.tagged_addresses,
            "NodeMeta": node.meta,
            "ServiceKind": self.kind,
            "ServiceID": self.id,
            "ServiceName": self.name,
            "ServiceTags": list(self.tags),
            "ServiceAddress": self.address,
            "ServiceWeights": dict(self.weights),
            "ServiceMeta": dict(self.meta),
            "ServicePort": self.port,
            "ServiceSocketPath": self.socket_path,
            "ServiceEnableTagOverride": self.enable_tag_override,
            "ServiceProxy": dict(self.proxy) if self.proxy is not None else _default_proxy(),
            "ServiceConnect": dict(self.connect),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.tagged_addresses:
            out["ServiceTaggedAddresses"] = {k: dict(v) for k, v in self.tagged_addresses.items()}
        if self.locality:
            out["ServiceLocality"] = dict(self.locality)
        return out


@dataclass
class CheckSpec:
    """What a check does (Consul's CheckType / CheckDefinition)."""

    check_id: str = ""
    name: str = ""
    notes: str = ""
    status: str = ""
    service_id: str = ""
    ttl: float = 0.0
    interval: float = 0.0
    timeout: float = 0.0
    deregister_after: float = 0.0
    http: str = ""
    method: str = ""
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    disable_redirects: bool = False
    tls_skip_verify: bool = False
    tcp: str = ""
    udp: str = ""
    script_args: list[str] = field(default_factory=list)
    docker_container_id: str = ""
    shell: str = ""
    grpc: str = ""
    h2ping: str = ""
    os_service: str = ""
    alias_service: str = ""
    alias_node: str = ""
    output_max_size: int = OUTPUT_MAX

    @classmethod
    def parse(cls, raw: Any, what: str) -> CheckSpec:
        f = Fields(raw, what)
        header = f.get("Header") or {}
        if not isinstance(header, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header.values()
        ):
            raise _decode_error(f"{what}.Header", "map[string][]string", header)
        return cls(
            check_id=f.text("CheckID", "ID"),
            name=f.text("Name"),
            notes=f.text("Notes"),
            status=f.text("Status"),
            service_id=f.text("ServiceID"),
            ttl=f.duration("TTL"),
            interval=f.duration("Interval"),
            timeout=f.duration("Timeout"),
            deregister_after=f.duration("DeregisterCriticalServiceAfter"),
            http=f.text("HTTP"),
            method=f.text("Method"),
            header={k: list(v) for k, v in header.items()},
            body=f.text("Body"),
            disable_redirects=f.flag("DisableRedirects"),
            tls_skip_verify=f.flag("TLSSkipVerify"),
            tcp=f.text("TCP"),
            udp=f.text("UDP"),
            script_args=f.str_list("Args", "ScriptArgs"),
            docker_container_id=f.text("DockerContainerID"),
            shell=f.text("Shell"),
            grpc=f.text("GRPC"),
            h2ping=f.text("H2PING"),
            os_service=f.text("OSService"),
            alias_service=f.text("AliasService"),
            alias_node=f.text("AliasNode"),
            output_max_size=f.integer("OutputMaxSize", default=OUTPUT_MAX) or OUTPUT_MAX,
        )

    @property
    def kind(self) -> str:
        if self.grpc:
            return "grpc"
        if self.http:
            return "http"
        if self.tcp:
            return "tcp"
        if self.udp:
            return "udp"
        if self.script_args and not self.docker_container_id:
            return "script"
        if self.ttl > 0:
            return "ttl"
        if self.docker_container_id:
            return "docker"
        if self.alias_service or self.alias_node:
            return "alias"
        if self.h2ping:
            return "h2ping"
        if self.os_service:
            return "os_service"
        return ""

    def empty(self) -> bool:
        return self == CheckSpec()

    def validate(self) -> None:
        interval_check = bool(
            (self.script_args and not self.docker_container_id)
            or self.http
            or self.tcp
            or self.udp
            or self.grpc
            or self.h2ping
            or self.os_service
        )
        alias = bool(self.alias_service or self.alias_node)
        if self.interval > 0 and self.ttl > 0:
            raise ValueError("Interval and TTL cannot both be specified")
        if interval_check and self.interval <= 0:
            raise ValueError("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks")
        if interval_check and alias:
            raise ValueError("Interval cannot be set for Alias checks")
        if alias and self.ttl > 0:
            raise ValueError("TTL must be not set for Alias checks")
        if not interval_check and not alias and self.ttl <= 0:
            raise ValueError("TTL must be > 0 for TTL checks")
        if self.status and self.status not in STATUSES:
            raise ValueError("Status for checks must 'passing', 'warning', 'critical'")

    def definition(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (
            ("HTTP", self.http),
            ("Header", self.header or None),
            ("Method", self.method),
            ("Body", self.body),
            ("DisableRedirects", self.disable_redirects),
            ("TLSSkipVerify", self.tls_skip_verify),
            ("TCP", self.tcp),
            ("UDP", self.udp),
            ("GRPC", self.grpc),
            ("H2PING", self.h2ping),
            ("OSService", self.os_service),
            ("ScriptArgs", self.script_args or None),
            ("DockerContainerID", self.docker_container_id),
            ("Shell", self.shell),
            ("AliasNode", self.alias_node),
            ("AliasService", self.alias_service),
        ):
            if value:
                out[key] = value
        out["Interval"] = format_duration(self.interval)
        out["Timeout"] = format_duration(self.timeout)
        out["DeregisterCriticalServiceAfter"] = format_duration(self.deregister_after)
        if self.ttl:
            out["TTL"] = format_duration(self.ttl)
        return out


@dataclass
class Check:
    node: str
    check_id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    type: str = ""
    spec: CheckSpec | None = None
    local: bool = False
    critical_since: float | None = None
    last_output: str = ""  # a TTL check's last update, kept for "TTL expired (...)"
    runner: Any = None  # asyncio.Task or TimerHandle
    create_index: int = 0
    modify_index: int = 0

    def to_json(self, agent_view: bool = False) -> dict[str, Any]:
        spec = self.spec
        interval = format_duration(spec.interval) if spec and spec.interval else ""
        timeout = format_duration(spec.timeout) if spec and spec.timeout else ""
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.type,
            "Interval": interval,
            "Timeout": timeout,
            "ExposedPort": 0,
            "Definition": spec.definition() if spec else {},
            "CreateIndex": 0 if agent_view else self.create_index,
            "ModifyIndex": 0 if agent_view else self.modify_index,
        }


@dataclass
class KVEntry:
    key: str
    value: bytes
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
