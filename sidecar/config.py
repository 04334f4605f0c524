"""The one frozen, validated configuration, built once at the edge (the CLI).

No I/O here: validation raises ConfigError naming the flag, and the CLI turns that into
one line and exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RegistryKind = Literal["local", "consul"]
REGISTRY_KINDS: tuple[RegistryKind, ...] = ("local", "consul")
LogLevel = Literal["debug", "info", "warning", "error"]
BalancerKind = Literal["p2c", "round_robin"]
BALANCER_KINDS: tuple[BalancerKind, ...] = ("p2c", "round_robin")
AccessLogFormat = Literal["json", "text", "off"]
ACCESS_LOG_FORMATS: tuple[AccessLogFormat, ...] = ("json", "text", "off")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
MtlsMode = Literal["permissive", "strict", "off"]
MTLS_MODES: tuple[MtlsMode, ...] = ("permissive", "strict", "off")
IdentityKind = Literal["local", "consul", "files"]
IDENTITY_KINDS: tuple[IdentityKind, ...] = ("local", "consul", "files")
DEFAULT_TRUST_DOMAIN = "micro-sidecar.local"
AppProtocol = Literal["http1", "h2c"]
APP_PROTOCOLS: tuple[AppProtocol, ...] = ("http1", "h2c")

DEFAULT_INBOUND_PORT = 15006
DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_ADMIN_PORT = 15020

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class ConfigError(ValueError):
    """A bad configuration value. The message starts with the flag it concerns."""

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f"{flag}: {problem}")
        self.flag = flag


@dataclass(frozen=True, slots=True)
class AppConfig:
    host: str
    port: int
    health_path: str  # "" means a TCP-connect probe
    health_interval: float
    health_timeout: float
    healthy_threshold: int
    unhealthy_threshold: int
    request_timeout: float
    max_request_body: int
    protocol: AppProtocol = "http1"  # what the app speaks: HTTP/1.1, or HTTP/2 in cleartext
    health_grpc: bool = False  # probe grpc.health.v1.Health/Check instead of health_path
    health_grpc_service: str = ""  # "": the whole server


@dataclass(frozen=True, slots=True)
class ListenConfig:
    inbound_host: str
    inbound_port: int
    outbound_host: str
    outbound_port: int
    admin_host: str
    admin_port: int
    workers: int = 1  # processes sharing the inbound and outbound ports
    worker_index: int = 0  # 0: the primary (registers, admin, app); >0: a forwarding worker
    primary_pid: int = 0  # in a worker: the primary process to outlive by no more than a moment
    # loopback ports dedicated to one service each (--upstream NAME=PORT)
    upstreams: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    id: str | None  # None: derived from name, advertised address and inbound port once bound
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    advertise_address: str


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    kind: RegistryKind
    path: Path  # the local SQLite file
    ttl: float
    deregister_after: float
    # consul settings as given (flag name -> value); resolved with the environment by the backend
    consul_flags: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """What one client or one upstream may cost the sidecar, per listener."""

    header_timeout: float
    idle_timeout: float
    body_timeout: float
    write_timeout: float
    tunnel_idle_timeout: float
    max_connections: int
    upstream_max_connections: int
    upstream_max_pending: int
    h2_max_streams: int = 1000  # HTTP/2 streams a client may have open on one connection


@dataclass(frozen=True, slots=True)
class TrafficConfig:
    """Outbound traffic management and what the sidecar records about requests."""

    balancer: BalancerKind
    connect_timeout: float
    per_try_timeout: float | None
    retries: int
    retry_budget: float
    retry_min_per_second: float
    outlier_failures: int
    outlier_ejection_time: float
    max_ejection_percent: float
    max_outstanding: int | None
    access_log: AccessLogFormat


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Mutual TLS between sidecars and who may call this one."""

    mtls: MtlsMode
    identity: IdentityKind
    trust_domain: str
    cert_ttl: float
    tls_cert: Path | None  # --identity files
    tls_key: Path | None
    tls_ca: Path | None
    allow_from: tuple[str, ...]  # empty: any caller of this mesh


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    drain_delay: float
    grace_period: float


@dataclass(frozen=True, slots=True)
class Config:
    app: AppConfig
    listen: ListenConfig
    service: ServiceConfig
    registry: RegistryConfig
    lifecycle: LifecycleConfig
    traffic: TrafficConfig
    limits: LimitsConfig
    log_level: LogLevel
    command: tuple[str, ...] = ()
    security: SecurityConfig = SecurityConfig(
        mtls="off",
        identity="local",
        trust_domain=DEFAULT_TRUST_DOMAIN,
        cert_ttl=86400.0,
        tls_cert=None,
        tls_key=None,
        tls_ca=None,
        allow_from=(),
    )

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary for /status, without secrets."""
        return {
            "name": self.service.name,
            "app": f"{self.app.host}:{self.app.port}",
            "app_protocol": self.app.protocol,
            "health_path": self.app.health_path or None,
            "health_grpc": self.app.health_grpc,
            "upstreams": {name: port for name, port in self.listen.upstreams},
            "health_interval": self.app.health_interval,
            "healthy_threshold": self.app.healthy_threshold,
            "unhealthy_threshold": self.app.unhealthy_threshold,
            "registry": self.registry.kind,
            "tags": list(self.service.tags),
            "meta": dict(self.service.meta),
            "drain_delay": self.lifecycle.drain_delay,
            "grace_period": self.lifecycle.grace_period,
            "balancer": self.traffic.balancer,
            "retries": self.traffic.retries,
            "access_log": self.traffic.access_log,
            "supervising": list(self.command[:1]),
            "mtls": self.security.mtls,
            "identity": self.security.identity if self.security.mtls != "off" else None,
            "allow_from": list(self.security.allow_from),
        }


def default_registry_path(env: Mapping[str, str] | None = None) -> Path:
    """The SQLite file every sidecar on this host shares unless told otherwise."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())
    user = env.get("USER") or str(os.getuid() if hasattr(os, "getuid") else "user")
    return base / f"micro-sidecar-{user}" / "registry.sqlite3"


def default_name(app_port: int, command: Sequence[str]) -> str:
    """A sensible service name when --name is absent: the command's base name, else app-<port>."""
    if command:
        base = re.sub(r"[^A-Za-z0-9-]+", "-", Path(command[0]).name).strip("-").lower()
        if base and _NAME_RE.match(base):
            return base
    return f"app-{app_port}"


def default_advertise_address(inbound_host: str) -> str:
    if inbound_host not in ("0.0.0.0", "::", ""):
        return inbound_host
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return addr


def _port(flag: str, value: int, allow_zero: bool = True) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(flag, f"{value} is not a port number ({low}-65535)")
    return value


def _positive(flag: str, value: float, allow_zero: bool = False) -> float:
    if value != value or value < 0 or (value == 0 and not allow_zero):  # NaN check first
        raise ConfigError(flag, f"{value} must be {'>= 0' if allow_zero else '> 0'} seconds")
    return float(value)


def _host(flag: str, value: str) -> str:
    if not value:
        raise ConfigError(flag, "must not be empty")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", value):
            raise ConfigError(flag, f"{value!r} is not an IP address or host name") from None
    return value


def _loopback(flag: str, value: str) -> str:
    _host(flag, value)
    if value == "localhost":
        return value
    try:
        if not ipaddress.ip_address(value).is_loopback:
            raise ConfigError(flag, f"{value} is not a loopback address")
    except ValueError:
        raise ConfigError(flag, f"{value!r} is not a loopback address") from None
    return value


def parse_meta(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--meta", f"{item!r} is not KEY=VALUE")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", key):
            raise ConfigError("--meta", f"key {key!r} may hold only letters, digits, '_' and '-'")
        meta[key] = value
    return meta


def parse_upstreams(items: Sequence[str], taken: Sequence[int]) -> tuple[tuple[str, int], ...]:
    """`NAME=PORT` items of --upstream: one loopback port per service, none shared."""
    out: list[tuple[str, int]] = []
    ports: set[int] = set()
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name or not text.isdigit():
            raise ConfigError("--upstream", f"{item!r} is not NAME=PORT")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name):
            raise ConfigError(
                "--upstream", f"{name!r} is not a service name (lower-case letters, digits, '-')"
            )
        port = _port("--upstream", int(text), allow_zero=False)
        if port in ports or port in [p for p in taken if p]:
            raise ConfigError("--upstream", f"port {port} is used twice")
        if any(known == name for known, _ in out):
            raise ConfigError("--upstream", f"{name!r} is named twice")
        ports.add(port)
        out.append((name, port))
    return tuple(out)


def build_config(
    *,
    app_port: int,
    app_host: str = "127.0.0.1",
    name: str | None = None,
    id: str | None = None,
    tags: Sequence[str] = (),
    meta: Sequence[str] = (),
    inbound_host: str = "0.0.0.0",
    inbound_port: int = DEFAULT_INBOUND_PORT,
    outbound_host: str = "127.0.0.1",
    outbound_port: int = DEFAULT_OUTBOUND_PORT,
    admin_host: str = "127.0.0.1",
    admin_port: int = DEFAULT_ADMIN_PORT,
    workers: int = 1,
    worker_index: int = 0,
    primary_pid: int = 0,
    advertise_address: str | None = None,
    health_path: str = "/health",
    health_interval: float = 2.0,
    health_timeout: float = 1.0,
    healthy_threshold: int = 1,
    unhealthy_threshold: int = 2,
    request_timeout: float = 30.0,
    max_request_body: int = 1024**3,
    app_protocol: str = "http1",
    health_grpc: bool = False,
    health_grpc_service: str = "",
    upstreams: Sequence[str] = (),
    h2_max_streams: int = 1000,
    registry: str = "local",
    registry_path: str | None = None,
    registry_ttl: float | None = None,
    deregister_after: float = 60.0,
    consul_flags: Mapping[str, str | None] | None = None,
    drain_delay: float = 2.0,
    grace_period: float = 20.0,
    lb: str = "p2c",
    connect_timeout: float = 2.0,
    per_try_timeout: float = 0.0,
    retries: int = 2,
    retry_budget: float = 0.2,
    retry_min_per_second: float = 3.0,
    outlier_failures: int = 5,
    outlier_ejection_time: float = 30.0,
    max_ejection_percent: float = 50.0,
    max_outstanding: int = 0,
    access_log: str = "json",
    header_timeout: float = 10.0,
    idle_timeout: float = 75.0,
    body_timeout: float = 30.0,
    write_timeout: float = 30.0,
    tunnel_idle_timeout: float = 300.0,
    max_connections: int = 10_000,
    upstream_max_connections: int = 256,
    upstream_max_pending: int = 1024,
    log_level: str = "info",
    mtls: str = "permissive",
    identity: str | None = None,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    cert_ttl: float = 86400.0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    allow_from: Sequence[str] = (),
    command: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Validate every value and build the frozen Config. Raises ConfigError."""
    _port("--app-port", app_port, allow_zero=False)
    _host("--app-host", app_host)
    _host("--inbound-host", inbound_host)
    _port("--inbound-port", inbound_port)
    _loopback("--outbound-host", outbound_host)
    _port("--outbound-port", outbound_port)
    _host("--admin-host", admin_host)
    _port("--admin-port", admin_port)
    if not 1 <= workers <= 256:
        raise ConfigError("--workers", f"{workers} must be between 1 and 256")
    if worker_index < 0:
        raise ConfigError("--worker-index", "must be >= 0")
    if health_path and not health_path.startswith("/"):
        raise ConfigError("--health-path", f"{health_path!r} must start with '/' (or be empty for TCP)")
    _positive("--health-interval", health_interval)
    _positive("--health-timeout", health_timeout)
    if healthy_threshold < 1:
        raise ConfigError("--healthy-threshold", "must be at least 1")
    if unhealthy_threshold < 1:
        raise ConfigError("--unhealthy-threshold", "must be at least 1")
    _positive("--request-timeout", request_timeout)
    if app_protocol not in APP_PROTOCOLS:
        raise ConfigError("--app-protocol", f"{app_protocol!r} is not one of {', '.join(APP_PROTOCOLS)}")
    if health_grpc and app_protocol != "h2c":
        raise ConfigError("--health-grpc", "needs an HTTP/2 app (--app-protocol h2c)")
    if app_protocol == "h2c" and health_path and not health_grpc:
        # the HTTP probe speaks HTTP/1.1, which an h2c app does not: with the default
        # path, probe by TCP connect instead; an explicit path cannot be honoured
        if health_path != "/health":
            raise ConfigError(
                "--health-path", "an h2c app is probed with --health-grpc or by TCP (--health-path '')"
            )
        health_path = ""
    if health_grpc_service and not health_grpc:
        raise ConfigError("--health-grpc-service", "is only used with --health-grpc")
    if health_grpc_service and not re.fullmatch(r"[A-Za-z0-9_.]{1,200}", health_grpc_service):
        raise ConfigError("--health-grpc-service", f"{health_grpc_service!r} is not a gRPC service name")
    if not 1 <= h2_max_streams <= 2**31 - 1:
        raise ConfigError("--h2-max-streams", f"{h2_max_streams} must be at least 1")
    parsed_upstreams = parse_upstreams(upstreams, (outbound_port, inbound_port, admin_port))
    if max_request_body < 0:
        raise ConfigError("--max-request-body", "must be >= 0 bytes")
    if registry not in REGISTRY_KINDS:
        raise ConfigError("--registry", f"{registry!r} is not one of {', '.join(REGISTRY_KINDS)}")
    _positive("--drain-delay", drain_delay, allow_zero=True)
    _positive("--grace-period", grace_period, allow_zero=True)
    _positive("--deregister-critical-after", deregister_after)
    if lb not in BALANCER_KINDS:
        raise ConfigError("--lb", f"{lb!r} is not one of {', '.join(BALANCER_KINDS)}")
    _positive("--connect-timeout", connect_timeout)
    _positive("--per-try-timeout", per_try_timeout, allow_zero=True)
    if retries < 0:
        raise ConfigError("--retries", "must be >= 0")
    if not 0 <= retry_budget <= 10:
        raise ConfigError("--retry-budget", "must be a ratio between 0 and 10")
    _positive("--retry-min-per-second", retry_min_per_second, allow_zero=True)
    if outlier_failures < 1:
        raise ConfigError("--outlier-failures", "must be at least 1")
    _positive("--outlier-ejection-time", outlier_ejection_time)
    if not 0 <= max_ejection_percent <= 100:
        raise ConfigError("--max-ejection-percent", "must be between 0 and 100")
    if max_outstanding < 0:
        raise ConfigError("--max-outstanding", "must be >= 0 (0: no limit)")
    if access_log not in ACCESS_LOG_FORMATS:
        raise ConfigError("--access-log", f"{access_log!r} is not one of {', '.join(ACCESS_LOG_FORMATS)}")
    for flag, value in (
        ("--header-timeout", header_timeout),
        ("--idle-timeout", idle_timeout),
        ("--body-timeout", body_timeout),
        ("--write-timeout", write_timeout),
        ("--tunnel-idle-timeout", tunnel_idle_timeout),
    ):
        _positive(flag, value)
    for flag, count in (
        ("--max-connections", max_connections),
        ("--upstream-max-connections", upstream_max_connections),
    ):
        if count < 1:
            raise ConfigError(flag, "must be at least 1")
    if upstream_max_pending < 0:
        raise ConfigError("--upstream-max-pending", "must be >= 0")
    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError("--log-level", f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}")

    security = _security(
        mtls, identity or registry, registry, trust_domain, cert_ttl, tls_cert, tls_key, tls_ca, allow_from
    )

    if name is None or name == "":
        name = default_name(app_port, command)
    elif not _NAME_RE.match(name):
        raise ConfigError("--name", f"{name!r} must be 1-63 letters, digits or '-', not starting with '-'")
    if id is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", id):
        raise ConfigError("--id", f"{id!r} may hold only letters, digits, '.', '_', ':' and '-'")
    for tag in tags:
        if not tag or len(tag) > 255 or any(c.isspace() for c in tag):
            raise ConfigError("--tag", f"{tag!r} must be non-empty, without spaces")
    parsed_meta = parse_meta(meta)

    if advertise_address:
        _host("--advertise-address", advertise_address)
    else:
        advertise_address = default_advertise_address(inbound_host)

    # The registry keeps an instance alive for a few probe intervals without news; the
    # registration loop refreshes it three times per TTL.
    ttl = registry_ttl if registry_ttl is not None else max(3.0 * health_interval, 3.0)
    _positive("--registry-ttl", ttl)

    path = Path(registry_path) if registry_path else default_registry_path(env)

    return Config(
        app=AppConfig(
            host=app_host,
            port=app_port,
            health_path=health_path,
            health_interval=float(health_interval),
            health_timeout=float(health_timeout),
            healthy_threshold=healthy_threshold,
            unhealthy_threshold=unhealthy_threshold,
            request_timeout=float(request_timeout),
            max_request_body=max_request_body,
            protocol=app_protocol,
            health_grpc=bool(health_grpc),
            health_grpc_service=health_grpc_service,
        ),
        listen=ListenConfig(
            inbound_host=inbound_host,
            inbound_port=inbound_port,
            outbound_host=outbound_host,
            outbound_port=outbound_port,
            admin_host=admin_host,
            admin_port=admin_port,
            workers=workers,
            worker_index=worker_index,
            primary_pid=primary_pid,
            upstreams=parsed_upstreams,
        ),
        service=ServiceConfig(
            name=name,
            id=id,
            tags=tuple(tags),
            meta=parsed_meta,
            advertise_address=advertise_address,
        ),
        registry=RegistryConfig(
            kind=registry,
            path=path,
            ttl=ttl,
            deregister_after=float(deregister_after),
            consul_flags=dict(consul_flags or {}),
        ),
        lifecycle=LifecycleConfig(drain_delay=float(drain_delay), grace_period=float(grace_period)),
        traffic=TrafficConfig(
            balancer=lb,
            connect_timeout=float(connect_timeout),
            per_try_timeout=float(per_try_timeout) or None,
            retries=retries,
            retry_budget=float(retry_budget),
            retry_min_per_second=float(retry_min_per_second),
            outlier_failures=outlier_failures,
            outlier_ejection_time=float(outlier_ejection_time),
            max_ejection_percent=float(max_ejection_percent),
            max_outstanding=max_outstanding or None,
            access_log=access_log,
        ),
        limits=LimitsConfig(
            header_timeout=float(header_timeout),
            idle_timeout=float(idle_timeout),
            body_timeout=float(body_timeout),
            write_timeout=float(write_timeout),
            tunnel_idle_timeout=float(tunnel_idle_timeout),
            max_connections=max_connections,
            upstream_max_connections=upstream_max_connections,
            upstream_max_pending=upstream_max_pending,
            h2_max_streams=h2_max_streams,
        ),
        log_level=log_level.lower(),  # type: ignore[arg-type]
        command=tuple(command),
        security=security,
    )


def _security(
    mtls: str,
    identity: str,
    registry: str,
    trust_domain: str,
    cert_ttl: float,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    allow_from: Sequence[str],
) -> SecurityConfig:
    if mtls not in MTLS_MODES:
        raise ConfigError("--mtls", f"{mtls!r} is not one of {', '.join(MTLS_MODES)}")
    if identity not in IDENTITY_KINDS:
        raise ConfigError("--identity", f"{identity!r} is not one of {', '.join(IDENTITY_KINDS)}")
    if identity == "consul" and registry != "consul":
        raise ConfigError("--identity", "consul needs --registry consul (the agent issues the certificates)")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", trust_domain):
        raise ConfigError("--trust-domain", f"{trust_domain!r} must be a lower-case DNS-like name")
    _positive("--cert-ttl", cert_ttl)
    if cert_ttl < 2:
        raise ConfigError("--cert-ttl", f"{cert_ttl} is too short (at least 2 seconds)")
    files = {"--tls-cert": tls_cert, "--tls-key": tls_key, "--tls-ca": tls_ca}
    if identity == "files":
        for flag, value in files.items():
            if not value:
                raise ConfigError(flag, "is required with --identity files")
    else:
        for flag, value in files.items():
            if value:
                raise ConfigError(flag, "is only used with --identity files")
    for caller in allow_from:
        if not _NAME_RE.match(caller):
            raise ConfigError("--allow-from", f"{caller!r} is not a service name")
    if allow_from and mtls == "off":
        raise ConfigError("--allow-from", "needs mutual TLS (--mtls permissive or strict)")
    return SecurityConfig(
        mtls=mtls,
        identity=identity,
        trust_domain=trust_domain,
        cert_ttl=float(cert_ttl),
        tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None,
        tls_ca=Path(tls_ca) if tls_ca else None,
        allow_from=tuple(dict.fromkeys(allow_from)),
    )
