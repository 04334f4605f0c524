"""The consul identity source: Consul's Connect CA through the local agent.

Rules of this file:
- All I/O goes through the ConsulRegistry's `api_get`: one client session, one place where
  failures become errors, the ACL token only in a header and scrubbed from every message.
  RegistryDenied (403: the token lacks service:write on the service) becomes IdentityDenied,
  every other registry error IdentityUnavailable.
- Roots come from `/v1/agent/connect/ca/roots` (every root in `Roots` is trusted), the leaf
  from `/v1/agent/connect/ca/leaf/<service>` (`CertPEM` is the leaf and its intermediates).
  `fetch(None)` reads both at once without blocking; `fetch(current)` holds a blocking query
  on each and returns when either answers something new.
- What is new is decided by content (the leaf's serial and chain, the roots' PEM), never by
  the index alone: an index that goes backwards (agent restarted, snapshot restored) only
  restarts the watch from the lower index.
- A leaf is handed out only with roots that sign it: when a leaf arrives that none of the
  known roots signs (a root rotation), the roots are read again first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ..registry.base import RegistryDenied, RegistryError
from ..registry.consul import ConsulRegistry
from .base import Identity, IdentityDenied, IdentitySource, IdentityUnavailable
from .certs import certs_to_pem, check_chain, identity_from_pem, load_certs

log = logging.getLogger(__name__)

WAIT = 60.0  # the hold time of each blocking query
QUICK = 0.05  # an unchanged answer faster than this twice in a row: pause before asking again
PAUSE = 0.5
ROOTS_PATH = "/v1/agent/connect/ca/roots"


@dataclass(frozen=True, slots=True)
class _Roots:
    pem: bytes
    ids: tuple[str, ...]
    active_id: str
    trust_domain: str
    index: int


@dataclass(frozen=True, slots=True)
class _Leaf:
    chain_pem: bytes
    key_pem: bytes
    serial: str
    index: int

    def __repr__(self) -> str:  # never the key
        return f"<leaf serial={self.serial} index={self.index}>"


def ordered_chain(chain_pem: bytes) -> bytes:
    """The leaf (first in `chain_pem`) followed by its issuers in order, each the issuer of
    the one before, whatever order they came in; certificates off that path are dropped."""
    certs = load_certs(chain_pem, "certificate")
    path, rest = [certs[0]], certs[1:]
    while rest:
        issuer = next((c for c in rest if c.subject == path[-1].issuer), None)
        if issuer is None:
            break
        path.append(issuer)
        rest.remove(issuer)
    return certs_to_pem(path)


def signed_by_roots(chain_pem: bytes, roots_pem: bytes) -> bool:
    """Whether some leading part of the chain is signed by one of the roots (after a rotation
    the chain may go on to a cross-signed certificate of a root that is gone by now)."""
    chain: list[x509.Certificate] = load_certs(chain_pem)
    for end in range(1, len(chain) + 1):
        try:
            check_chain(certs_to_pem(chain[:end]), roots_pem)
        except ValueError:
            continue
        return True
    return False


class ConsulIdentitySource(IdentitySource):
    """This sidecar's identity from Consul's Connect CA: the leaf of `service` and the roots."""

    kind = "consul"

    def __init__(self, registry: ConsulRegistry, service: str, *, wait: float = WAIT) -> None:
        self._registry = registry
        self._service = service
        self._wait = wait
        self._roots: _Roots | None = None
        self._leaf: _Leaf | None = None
        self._identity: Identity | None = None
        self._watches: dict[str, asyncio.Task[Any]] = {}

    def __repr__(self) -> str:
        roots = len(self._roots.ids) if self._roots else 0
        serial = self._leaf.serial if self._leaf else None
        return f"<ConsulIdentitySource {self._service!r} roots={roots} leaf={serial}>"

    async def close(self) -> None:
        await self._stop_watches()

    async def fetch(self, current: Identity | None) -> Identity:
        try:
            if current is None or self._identity is None:
                return await self._fetch_now()
            if not _same(current, self._identity):
                return self._identity  # a newer one came in after `current` was handed out
            return await self._next_change()
        except RegistryDenied as exc:
            raise IdentityDenied(f"consul identity for {self._service!r}: {exc}") from None
        except RegistryError as exc:
            raise IdentityUnavailable(f"consul identity for {self._service!r}: {exc}") from None
        finally:
            await self._stop_watches()

    def describe(self) -> dict[str, object]:
        roots, leaf = self._roots, self._leaf
        return {
            "kind": self.kind,
            "service": self._service,
            "agent": self._registry.describe().get("addr"),
            "trust_domain": roots.trust_domain if roots else None,
            "roots": len(roots.ids) if roots else 0,
            "active_root": roots.active_id if roots else None,
            "leaf_serial": leaf.serial if leaf else None,
        }

    # -- reading ------------------------------------------------------------------------------

    async def _fetch_now(self) -> Identity:
        roots, leaf = await asyncio.gather(self._read_roots(0), self._read_leaf(0), return_exceptions=True)
        for outcome in (leaf, roots):  # a refused leaf (403) says more than unreachable roots
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(roots, _Roots) and isinstance(leaf, _Leaf)
        self._roots, self._leaf = roots, leaf
        return await self._use()

    async def _next_change(self) -> Identity:
        quick = 0
        while True:
            for name, start in (("roots", self._watch_roots), ("leaf", self._watch_leaf)):
                if name not in self._watches:
                    self._watches[name] = asyncio.create_task(start())
            started = time.monotonic()
            done, _ = await asyncio.wait(self._watches.values(), return_when=asyncio.FIRST_COMPLETED)
            changed = False
            # Roots first: when both answer together, the new root is in place for the new leaf.
            for name in ("roots", "leaf"):
                task = self._watches.get(name)
                if task is None or task not in done:
                    continue
                del self._watches[name]
                changed |= self._take(task.result())
            if changed:
                return await self._use()
            quick = quick + 1 if time.monotonic() - started < QUICK else 0
            if quick >= 2:
                await asyncio.sleep(PAUSE)

    async def _watch_roots(self) -> _Roots:
        assert self._roots is not None
        return await self._read_roots(self._roots.index)

    async def _watch_leaf(self) -> _Leaf:
        assert self._leaf is not None
        return await self._read_leaf(self._leaf.index)

    def _take(self, answer: _Roots | _Leaf) -> bool:
        """Keep a watch's answer; whether its content is new."""
        if isinstance(answer, _Roots):
            old_roots, self._roots = self._roots, answer
            return old_roots is None or old_roots.pem != answer.pem
        old_leaf, self._leaf = self._leaf, answer
        return old_leaf is None or old_leaf.chain_pem != answer.chain_pem

    async def _use(self) -> Identity:
        assert self._roots is not None and self._leaf is not None
        leaf = self._leaf
        if not signed_by_roots(leaf.chain_pem, self._roots.pem):
            # A leaf under a root we have not seen yet: the roots first, then the leaf.
            self._roots = await self._read_roots(0)
            if not signed_by_roots(leaf.chain_pem, self._roots.pem):
                raise IdentityUnavailable(
                    f"consul identity for {self._service!r}: the leaf (serial {leaf.serial}) is not "
                    f"signed by any of the {len(self._roots.ids)} roots consul lists"
                )
        try:
            identity = identity_from_pem(leaf.chain_pem, leaf.key_pem, self._roots.pem, source=self.kind)
        except ValueError as exc:
            raise IdentityUnavailable(f"consul identity for {self._service!r}: the leaf: {exc}") from None
        if identity.spiffe_id.service != self._service:
            raise IdentityUnavailable(
                f"consul identity for {self._service!r}: the leaf is for {identity.spiffe_id}, "
                f"not for service {self._service!r}"
            )
        self._identity = identity
        return identity

    async def _read_roots(self, index: int) -> _Roots:
        body, new_index = await self._registry.api_get(
            ROOTS_PATH,
            index=index,
            wait=self._wait if index else 0.0,
            op="reading the Connect CA roots",
            needs="a known ACL token (the roots need no permission)",
        )
        try:
            roots = body["Roots"]
            pems = [str(r["RootCert"]).strip() + "\n" for r in roots]
            ids = tuple(str(r["ID"]) for r in roots)
            active, trust_domain = str(body.get("ActiveRootID", "")), str(body.get("TrustDomain", ""))
            pem = certs_to_pem(load_certs("".join(pems).encode(), "root certificate"))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise IdentityUnavailable(
                f"consul identity for {self._service!r}: {ROOTS_PATH} answered without usable Roots"
            ) from None
        return _Roots(pem, ids, active, trust_domain, new_index or index)

    async def _read_leaf(self, index: int) -> _Leaf:
        service = self._service
        body, new_index = await self._registry.api_get(
            f"/v1/agent/connect/ca/leaf/{service}",
            index=index,
            wait=self._wait if index else 0.0,
            op=f"reading the leaf certificate of {service!r}",
            needs=f"service:write on {service!r}",
        )
        try:
            chain = ordered_chain(str(body["CertPEM"]).encode())
            key = str(body["PrivateKeyPEM"]).encode()
            serial = str(body.get("SerialNumber", ""))
        except (KeyError, TypeError, ValueError):
            raise IdentityUnavailable(
                f"consul identity for {service!r}: the leaf answer has no usable CertPEM and PrivateKeyPEM"
            ) from None
        return _Leaf(chain, key, serial, new_index or index)

    async def _stop_watches(self) -> None:
        watches, self._watches = list(self._watches.values()), {}
        for task in watches:
            task.cancel()
        for task in watches:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _same(a: Identity, b: Identity) -> bool:
    return a.chain_pem == b.chain_pem and a.roots_pem == b.roots_pem and a.key_pem == b.key_pem
