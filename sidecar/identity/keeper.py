"""Keeping this sidecar's identity current: the first fetch, every rotation after it, and
what the rest of the sidecar asks of it (the TLS contexts for the next handshake, whether
there is a valid identity now, what /status shows).

Rules of this file:
- a rotation swaps the contexts in one step (`MeshTLS.update`): handshakes after it use
  the new certificate; connections made before it go on until they close;
- a source that fails is retried with backoff, and the last identity stays in use while
  it is valid; an expired or not-yet-valid identity is never offered for a handshake:
  `/ready` says so, outbound mTLS calls get 503 identity_unavailable, and TLS clients of
  the inbound port are refused at the handshake;
- nothing here logs or shows the private key.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Collection, Iterator

from ..backoff import Backoff
from .base import Identity, IdentityError, IdentitySource, SpiffeId
from .tls import ClientTLS, MeshTLS

log = logging.getLogger(__name__)

# How long start-up waits for the first identity before serving without one.
START_TIMEOUT = 5.0


class IdentityKeeper:
    def __init__(self, source: IdentitySource) -> None:
        self.source = source
        self.mesh: MeshTLS | None = None
        self.rotations = 0
        self.last_error: str | None = None
        self._clients: dict[str, ClientTLS] = {}

    def __repr__(self) -> str:
        return f"<IdentityKeeper {self.source.kind} {self.identity!r} rotations={self.rotations}>"

    @property
    def identity(self) -> Identity | None:
        return self.mesh.identity if self.mesh is not None else None

    @property
    def spiffe_id(self) -> SpiffeId | None:
        identity = self.identity
        return identity.spiffe_id if identity is not None else None

    def trust_domains(self) -> TrustDomains:
        """The trust domain of whatever identity is current (a live view)."""
        return TrustDomains(self)

    def valid(self) -> bool:
        identity = self.identity
        return identity is not None and identity.valid()

    # -- for the listeners and pools -----------------------------------------------------

    def server_context(self) -> ssl.SSLContext | None:
        return self.mesh.server_context() if self.mesh is not None and self.valid() else None

    def client(self, service: str) -> ClientTLS | None:
        """How to dial `service` over mutual TLS; None while there is no valid identity."""
        if self.mesh is None or not self.valid():
            return None
        client = self._clients.get(service)
        if client is None:
            client = self._clients[service] = self.mesh.client(service)
        return client

    # -- life -------------------------------------------------------------------------------

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """The first identity, if it can be had within `timeout` (else `run` keeps
        trying): a hung source must not hold up the listeners."""
        await self.source.open()
        try:
            self._use(await asyncio.wait_for(self.source.fetch(None), timeout))
        except IdentityError as exc:
            self._failed(exc, "no identity yet: %s")
        except TimeoutError:
            self._failed(
                IdentityError(f"{self.source.kind}: no answer within {timeout:g}s"), "no identity yet: %s"
            )

    async def run(self) -> None:
        """Until cancelled: wait for each replacement and swap it in."""
        backoff = Backoff(base=0.5, cap=15.0)
        while True:
            try:
                identity = await self.source.fetch(self.identity)
            except IdentityError as exc:
                self._failed(exc, "identity: %s; retrying")
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._use(identity)

    async def close(self) -> None:
        await self.source.close()

    def _failed(self, exc: IdentityError, how: str) -> None:
        """Log a failure once while it stays the same (retries are not news)."""
        text = str(exc)
        if text != self.last_error:
            log.warning(how, text)
        else:
            log.debug(how, text)
        self.last_error = text

    def _use(self, identity: Identity) -> None:
        if self.last_error is not None:
            log.info("identity: the source answers again")
        self.last_error = None
        if self.mesh is None:
            self.mesh = MeshTLS(identity)
            log.info(
                "identity %s (serial %s, until %s)", identity.spiffe_id, identity.serial, _when(identity)
            )
            return
        if (
            identity.chain_pem == self.mesh.identity.chain_pem
            and identity.roots_pem == self.mesh.identity.roots_pem
        ):
            return
        self.mesh.update(identity)
        self.rotations += 1
        log.info("identity rotated: serial %s, until %s", identity.serial, _when(identity))

    def describe(self) -> dict[str, object]:
        identity = self.identity
        return {
            "source": self.source.describe(),
            "identity": identity.describe() if identity is not None else None,
            "rotations": self.rotations,
            "last_error": self.last_error,
        }

    def seconds_to_expiry(self) -> float | None:
        identity = self.identity
        return None if identity is None else identity.not_after - time.time()


def _when(identity: Identity) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(identity.not_after))


class TrustDomains(Collection[str]):
    """This sidecar's own trust domain, read from its current identity at each use."""

    def __init__(self, keeper: IdentityKeeper) -> None:
        self._keeper = keeper

    def _now(self) -> tuple[str, ...]:
        own = self._keeper.spiffe_id
        return (own.trust_domain,) if own is not None else ()

    def __contains__(self, domain: object) -> bool:
        return domain in self._now()

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())
