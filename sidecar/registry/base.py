"""The registry interface that every backend implements.

Rules of this file: backends do I/O only. Retry, backoff, caching and the decision of
when to refresh live in `sidecar.registration` and `sidecar.discovery`, which are the
same for every backend. A backend translates its own failures into the small error tree
below, in one place, and never puts a secret (an ACL token) into an error message.

A backend reports facts, not routing decisions: which registered, live instances pass
their health checks (`QueryResult.instances`) and which do not (`QueryResult.critical`).
The panic rule (when no instance passes, callers route to every registered, live one,
critical included) is applied in `sidecar.discovery`, the same for every backend. "Live"
is the backend's own notion: the local registry's heartbeat within its TTL (an expired row
is gone, never critical); for Consul, the instance is still in the health answer (Consul
removes it after DeregisterCriticalServiceAfter).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["passing", "warning", "critical"]

# Registration meta saying how the instance's inbound port takes mesh calls: "permissive"
# or "strict" (mutual TLS), absent or "off" (plaintext only).
MTLS_META = "mtls"
# "1": the sidecar's inbound port takes HTTP/2 (h2c, or h2 over mutual TLS); absent: an
# older sidecar, which HTTP/2 callers reach over HTTP/1.1 (gRPC cannot be).
H2_META = "h2"
# What the app behind the sidecar speaks: "http1" or "h2c" (--app-protocol).
APP_PROTOCOL_META = "app_protocol"


def join_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance of a service: where its sidecar's inbound listener is."""

    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return join_host_port(self.address, self.port)


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """How the registry should judge this instance's liveness on its own.

    `ttl`: the instance is considered gone (local) or critical (consul) when no report
    arrives for this long. `deregister_after`: consul removes an instance that stayed
    critical this long (the backstop for a sidecar killed with SIGKILL).
    """

    ttl: float
    deregister_after: float


@dataclass(frozen=True, slots=True)
class QueryResult:
    """The answer to a (possibly blocking) discovery query.

    `known` is False when the registry has never heard of the name (the outbound
    listener answers 404); a name with only critical instances is known. `instances`
    holds the live instances that pass their health checks; `critical` the live,
    registered ones that do not (Consul: any check warning or critical; local: a status
    other than passing with a fresh heartbeat). Discovery routes to `instances`, or, when
    that is empty, to `critical` (panic); 503 only when both are empty. An instance is in
    at most one of the two. `index` is the value to pass to the next query; it changes
    when either set changes.
    """

    index: int
    known: bool
    instances: tuple[Instance, ...]
    critical: tuple[Instance, ...] = ()


class RegistryError(Exception):
    """Base of the registry errors; messages name the backend and what failed."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or answered with a server error."""


class RegistrationLost(RegistryError):
    """The registry no longer knows this instance (agent restarted, state wiped)."""


class RegistryDenied(RegistryError):
    """The registry refused the operation (for Consul: an ACL permission is missing)."""


class Registry(abc.ABC):
    """A service registry backend."""

    kind: str = "abstract"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare connections or files. Must not fail when the registry is down."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or files."""

    @abc.abstractmethod
    async def register(self, instance: Instance, check: CheckSpec, status: Status, note: str) -> None:
        """Create or replace the registration of `instance` with the given health."""

    @abc.abstractmethod
    async def report(self, instance_id: str, status: Status, note: str) -> None:
        """Refresh the instance's liveness and health. Raise RegistrationLost if unknown."""

    @abc.abstractmethod
    async def deregister(self, instance_id: str) -> None:
        """Remove the instance. Removing an unknown instance is not an error."""

    @abc.abstractmethod
    async def query(self, name: str, index: int, wait: float) -> QueryResult:
        """The passing and the critical (registered, live, not passing) instances of `name`.

        With index 0, answer at once. Otherwise block until the answer differs from the
        one that `index` stands for, or until `wait` seconds have passed (then answer
        with the same index).
        """

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for /status. Never includes secrets."""
        return {"kind": self.kind}
