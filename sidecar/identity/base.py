"""The identity interface that every source implements, and SPIFFE IDs.

Rules of this file: sources do I/O and certificate work only. When to rebuild TLS
contexts, what is reported in /ready and /status, and what happens while no identity is
valid are decided by the caller (the runtime), the same for every source. A source
translates its own failures into the small error tree below and never puts a private
key (or a Consul ACL token) into an error message, a log line or `describe()`.

An identity is one X.509 leaf certificate (EC P-256) whose only identity is a SPIFFE URI
SAN naming its service (`spiffe://<trust domain>/ns/<namespace>/dc/<dc>/svc/<service>`),
the chain that goes with it, its private key, and the roots this sidecar trusts.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload's SPIFFE ID, in one of the two layouts meshes use for services:

    - Consul's `spiffe://<domain>/ns/<namespace>/dc/<dc>/svc/<service>` (ours too);
    - Kubernetes' `spiffe://<domain>/ns/<namespace>/sa/<service account>` (cert-manager's
      csi-driver-spiffe, Istio, SPIRE's Kubernetes registrar), whose service account
      stands for the service: name it after the service.
    """

    trust_domain: str
    service: str
    namespace: str = "default"
    datacenter: str = "local"
    layout: str = "svc"  # "svc" (Consul's) or "sa" (Kubernetes')

    @property
    def uri(self) -> str:
        if self.layout == "sa":
            return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service}"
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/dc/{self.datacenter}/svc/{self.service}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """A workload SPIFFE ID in one of the two layouts; ValueError for anything else."""
        scheme, sep, rest = uri.partition("://")
        if scheme.lower() != "spiffe" or not sep:
            raise ValueError(f"not a SPIFFE ID: {uri[:200]!r}")
        trust_domain, _, path = rest.partition("/")
        parts = path.split("/")
        if trust_domain and all(parts):
            if len(parts) == 6 and parts[0::2] == ["ns", "dc", "svc"]:
                return cls(trust_domain.lower(), parts[5], parts[1], parts[3])
            if len(parts) == 4 and parts[0::2] == ["ns", "sa"]:
                return cls(trust_domain.lower(), parts[3], parts[1], "", "sa")
        raise ValueError(
            f"not a service SPIFFE ID (spiffe://<domain>/ns/N/dc/D/svc/S or /ns/N/sa/S): {uri[:200]!r}"
        )


@dataclass(frozen=True, repr=False)
class Identity:
    """A leaf certificate, its key and the trusted roots, all PEM.

    `chain_pem` is the leaf first, then any intermediates; `roots_pem` every trusted root.
    Times are seconds since the epoch. `key_pem` is secret: `repr()` and `describe()`
    leave it out.
    """

    spiffe_id: SpiffeId
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    roots_pem: bytes
    not_before: float
    not_after: float
    serial: str
    source: str

    def __repr__(self) -> str:
        return f"<Identity {self.spiffe_id} serial={self.serial} source={self.source}>"

    def valid(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.not_before <= now < self.not_after

    def describe(self, now: float | None = None) -> dict[str, object]:
        """For /status: never the key."""
        now = time.time() if now is None else now
        return {
            "spiffe_id": self.spiffe_id.uri,
            "serial": self.serial,
            "not_before": _iso(self.not_before),
            "not_after": _iso(self.not_after),
            "seconds_to_expiry": round(self.not_after - now, 3),
            "valid": self.valid(now),
            "source": self.source,
        }


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class IdentityError(Exception):
    """Base of the identity errors; messages name the source and what failed."""


class IdentityUnavailable(IdentityError):
    """The source could not be reached or could not issue (yet); worth retrying."""


class IdentityDenied(IdentityError):
    """The source refused (Consul: the token lacks service:write for this service)."""


class IdentitySource(abc.ABC):
    """Where this sidecar's identity comes from."""

    kind: str = "abstract"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare files or connections. Must not fail when the source is down."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release files or connections."""

    @abc.abstractmethod
    async def fetch(self, current: Identity | None) -> Identity:
        """The identity to use.

        With `current` None, answer as soon as an identity can be had (raise
        IdentityUnavailable when it cannot). Otherwise block until `current` should be
        replaced (its renewal time came, the roots changed, the files changed) and return
        the replacement; a new root is in `roots_pem` no later than the first leaf it
        signs. Cancelling the call is safe.
        """

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for /status. Never includes secrets."""
        return {"kind": self.kind}


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str


class Authorizer(abc.ABC):
    """Who may call this service: decided on the caller's verified service name."""

    kind: str = "abstract"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Start keeping the rules current (a blocking query, for Consul)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop keeping the rules current."""

    @abc.abstractmethod
    def decide(self, caller: SpiffeId) -> Decision:
        """Whether the verified `caller` may call. No I/O: this runs for every inbound
        request. (Plaintext callers have no identity: `--mtls` decides about them.)"""

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind}
