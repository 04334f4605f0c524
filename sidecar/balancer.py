"""Picking one endpoint of a service, with live per-endpoint stats and passive outlier ejection.

Rules of this file:
- `acquire` is the only way a request gets an endpoint; every lease is given back exactly
  once with `release(lease, outcome)` (a second release is ignored), so `outstanding`
  stays true even when the endpoint set changes while requests are in flight;
- stats are keyed by instance id and follow the set that discovery hands in: ids still
  present keep their stats, ids that left are dropped (their open leases keep working);
- a failure is a connect failure, a reset, a per-try timeout or a 5xx answer; `failures`
  of them in a row eject the endpoint for `base_ejection * times ejected` (capped),
  but never more than `max_ejection_percent` of a service's instances at once;
- an ejected endpoint comes back by itself when its period ends; when every endpoint is
  ejected or excluded, the pick falls back to all of them rather than failing;
- nothing here does I/O or reads the clock except through the injected `now`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import BALANCER_KINDS, BalancerKind
from .errors import NoHealthyInstance, SidecarError
from .registry.base import Instance
from .retry import FailureKind

# The kinds (and their names for the --lb flag) are config's.
# Above this many instances a pick draws a few endpoints instead of scanning them all.
SCAN_LIMIT = 64
DRAWS = 16

# What became of a leased request: an HTTP status when the endpoint answered (5xx counts
# as a failure), a failure kind when it did not, "cancelled" when the caller went away
# (neither a success nor a failure of the endpoint).
Outcome = FailureKind | Literal["success", "cancelled"] | int


class ServiceOverloaded(SidecarError):
    """More requests in flight to one service than its concurrency limit: a fast 503."""

    status = 503
    code = "service_overloaded"


@dataclass(slots=True)
class EndpointStats:
    """What this sidecar has seen of one endpoint lately."""

    instance: Instance
    outstanding: int = 0
    consecutive_failures: int = 0
    ejections: int = 0  # how many times it was ejected; drives the next period
    ejected_until: float | None = None  # end of the latest ejection, on the balancer's clock
    requests: int = 0
    failures: int = 0

    def ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until


@dataclass(slots=True)
class Lease:
    """One request's hold on one endpoint, from `acquire` to `release`."""

    service: str
    instance: Instance
    stats: EndpointStats
    released: bool = False

    def __repr__(self) -> str:
        state = "released" if self.released else "open"
        return f"<Lease {self.service} -> {self.instance.id} {state}>"


@dataclass(slots=True)
class _Service:
    instances: Sequence[Instance] = ()
    ids: tuple[str, ...] = ()
    stats: dict[str, EndpointStats] = field(default_factory=dict)
    outstanding: int = 0
    cursor: int = 0  # round robin's position


def is_failure(outcome: Outcome) -> bool:
    """Whether `outcome` counts against the endpoint for ejection."""
    if isinstance(outcome, int):
        return outcome >= 500
    return outcome not in ("success", "cancelled")


class Balancer:
    """Per-service endpoint picking over live stats; subclasses choose among candidates.

    `failures`: consecutive failures that eject an endpoint. `base_ejection` and
    `max_ejection`: the first period and the cap (seconds). `max_ejection_percent`: the
    share of a service's instances that may be ejected at once (rounded down, so a
    service with one instance is never ejected). `max_outstanding`: the per-service
    concurrency limit beyond which `acquire` raises ServiceOverloaded (None: no limit).
    `on_eject(service, instance, seconds)` is called on each ejection (for metrics/logs).
    """

    kind: BalancerKind

    def __init__(
        self,
        *,
        failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejection_percent: float = 50.0,
        max_outstanding: int | None = None,
        now: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_eject: Callable[[str, Instance, float], None] | None = None,
    ) -> None:
        self.failures = failures
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejection_percent = max_ejection_percent
        self.max_outstanding = max_outstanding
        self.now = now
        self.rng = rng or random.Random()
        self.on_eject = on_eject
        self.ejections_total = 0
        self._services: dict[str, _Service] = {}

    def __repr__(self) -> str:
        now = self.now()
        endpoints = [s for svc in self._services.values() for s in svc.stats.values()]
        outstanding = sum(s.outstanding for s in endpoints)
        ejected = sum(s.ejected(now) for s in endpoints)
        return (
            f"<{type(self).__name__} services={len(self._services)} endpoints={len(endpoints)} "
            f"outstanding={outstanding} ejected={ejected}>"
        )

    # -- the hot path ----------------------------------------------------------------

    def acquire(self, service: str, instances: Sequence[Instance], exclude: Collection[str] = ()) -> Lease:
        """Pick an endpoint of `service` and count the request against it.

        `instances` is discovery's current healthy set; `exclude` holds the ids already
        tried by this request (a retry goes elsewhere when it can). Raises
        NoHealthyInstance when `instances` is empty and ServiceOverloaded beyond the
        concurrency limit. Give the lease back with `release`.
        """
        svc = self._sync(service, instances)
        if self.max_outstanding is not None and svc.outstanding >= self.max_outstanding:
            raise ServiceOverloaded(
                f"service {service!r} has {svc.outstanding} requests in flight (limit {self.max_outstanding})"
            )
        stats = self._pick(service, svc, exclude)
        stats.outstanding += 1
        stats.requests += 1
        svc.outstanding += 1
        return Lease(service, stats.instance, stats)

    def release(self, lease: Lease, outcome: Outcome) -> None:
        """Give `lease` back with what became of the request; updates ejection state."""
        if lease.released:
            return
        lease.released = True
        stats = lease.stats
        stats.outstanding -= 1
        svc = self._services.get(lease.service)
        if svc is not None:
            svc.outstanding -= 1
        if outcome == "cancelled":
            return
        if not is_failure(outcome):
            stats.consecutive_failures = 0
            return
        stats.failures += 1
        stats.consecutive_failures += 1
        now = self.now()
        if stats.consecutive_failures < self.failures or stats.ejected(now):
            return
        if svc is None or svc.stats.get(stats.instance.id) is not stats:
            return  # the endpoint left the set while this request was in flight
        self._eject(lease.service, svc, stats, now)

    def pick(self, name: str, instances: Sequence[Instance], exclude: Collection[str] = ()) -> Instance:
        """Choose an endpoint without counting a request against it."""
        return self._pick(name, self._sync(name, instances), exclude).instance

    # -- decisions ---------------------------------------------------------------------

    def _sync(self, service: str, instances: Sequence[Instance]) -> _Service:
        if not instances:
            raise NoHealthyInstance(f"service {service!r} has no healthy instance")
        svc = self._services.get(service)
        if svc is None:
            svc = self._services[service] = _Service()
        # discovery hands the same tuple until something changes: compare by identity first
        if instances is not svc.instances and tuple(instances) != svc.instances:
            old = svc.stats
            svc.stats = {}
            for instance in instances:
                stats = old.get(instance.id)
                if stats is None:
                    stats = EndpointStats(instance)
                else:
                    stats.instance = instance  # same id, maybe a new address
                svc.stats[instance.id] = stats
            svc.instances = tuple(instances)
            svc.ids = tuple(svc.stats)
        return svc

    def _pick(self, service: str, svc: _Service, exclude: Collection[str]) -> EndpointStats:
        now = self.now()
        if len(svc.ids) > SCAN_LIMIT:
            # Large services: a few random (or next-in-turn) draws instead of a scan, so
            # the cost of a pick does not grow with the number of instances.
            drawn = self._draw(service, svc, exclude, now)
            if drawn is not None:
                return drawn
        every = [svc.stats[i] for i in svc.ids]
        candidates = [s for s in every if self._eligible(s, exclude, now)]
        if not candidates:
            candidates = [s for s in every if s.instance.id not in exclude] or every
        return self._choose(service, candidates)

    def _choose(self, service: str, candidates: list[EndpointStats]) -> EndpointStats:
        raise NotImplementedError

    def _draw(
        self, service: str, svc: _Service, exclude: Collection[str], now: float
    ) -> EndpointStats | None:
        """A pick without scanning every endpoint, or None to fall back to the scan."""
        return None

    @staticmethod
    def _eligible(stats: EndpointStats, exclude: Collection[str], now: float) -> bool:
        return not stats.ejected(now) and stats.instance.id not in exclude

    def _eject(self, service: str, svc: _Service, stats: EndpointStats, now: float) -> None:
        allowed = math.floor(len(svc.ids) * self.max_ejection_percent / 100.0)
        ejected = sum(1 for s in svc.stats.values() if s.ejected(now))
        if ejected >= allowed:
            return  # stays in rotation; ejected as soon as there is room
        if stats.ejected_until is not None and now - stats.ejected_until >= self.max_ejection:
            stats.ejections = 0  # behaved for a long while since its last return: start over
        stats.ejections += 1
        period = min(self.max_ejection, self.base_ejection * stats.ejections)
        stats.ejected_until = now + period
        stats.consecutive_failures = 0
        self.ejections_total += 1
        if self.on_eject is not None:
            self.on_eject(service, stats.instance, period)

    # -- state for /status and /metrics ---------------------------------------------

    def outstanding(self, service: str) -> int:
        """Requests in flight to `service` through this balancer."""
        svc = self._services.get(service)
        return 0 if svc is None else svc.outstanding

    def counts(self, service: str) -> tuple[int, int]:
        """(endpoints, ejected endpoints) of `service`, as last seen."""
        svc = self._services.get(service)
        if svc is None:
            return 0, 0
        now = self.now()
        return len(svc.ids), sum(1 for s in svc.stats.values() if s.ejected(now))

    def services(self) -> list[str]:
        return sorted(self._services)

    def describe_all(self) -> dict[str, list[dict[str, object]]]:
        """`describe` for every service this balancer has picked for."""
        return {service: self.describe(service) for service in self.services()}

    def describe(self, service: str) -> list[dict[str, object]]:
        """Per-endpoint state of `service` for /status (JSON-able)."""
        svc = self._services.get(service)
        if svc is None:
            return []
        now = self.now()
        out: list[dict[str, object]] = []
        for instance_id in svc.ids:
            s = svc.stats[instance_id]
            ejected = s.ejected(now)
            remaining = (s.ejected_until - now) if ejected and s.ejected_until is not None else None
            out.append(
                {
                    "id": instance_id,
                    "endpoint": s.instance.endpoint,
                    "health": "ejected" if ejected else "healthy",
                    "outstanding": s.outstanding,
                    "consecutive_failures": s.consecutive_failures,
                    "ejected_until": None if remaining is None else round(time.time() + remaining, 3),
                    "ejected_for_seconds": None if remaining is None else round(remaining, 3),
                    "ejections": s.ejections,
                    "requests": s.requests,
                    "failures": s.failures,
                }
            )
        return out


class P2C(Balancer):
    """Power of two choices: of two random candidates, the one with fewer requests in flight."""

    kind: BalancerKind = "p2c"

    def _choose(self, service: str, candidates: list[EndpointStats]) -> EndpointStats:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return b if b.outstanding < a.outstanding else a

    def _draw(
        self, service: str, svc: _Service, exclude: Collection[str], now: float
    ) -> EndpointStats | None:
        ids, found = svc.ids, []
        for _ in range(DRAWS):
            stats = svc.stats[ids[self.rng.randrange(len(ids))]]
            if self._eligible(stats, exclude, now) and stats not in found:
                found.append(stats)
                if len(found) == 2:
                    a, b = found
                    return b if b.outstanding < a.outstanding else a
        return None


class RoundRobin(Balancer):
    """One counter per service; tolerant of the instance list changing between calls."""

    kind: BalancerKind = "round_robin"

    def _choose(self, service: str, candidates: list[EndpointStats]) -> EndpointStats:
        svc = self._services[service]
        n = svc.cursor
        svc.cursor = n + 1
        return candidates[n % len(candidates)]

    def _draw(
        self, service: str, svc: _Service, exclude: Collection[str], now: float
    ) -> EndpointStats | None:
        ids = svc.ids
        for _ in range(DRAWS):
            stats = svc.stats[ids[svc.cursor % len(ids)]]
            svc.cursor += 1
            if self._eligible(stats, exclude, now):
                return stats
        return None


def make_balancer(kind: BalancerKind = "p2c", **options: Any) -> Balancer:
    """A balancer by its flag name; `options` are Balancer's keyword arguments."""
    classes: dict[str, type[Balancer]] = {"p2c": P2C, "round_robin": RoundRobin}
    try:
        cls = classes[kind]
    except KeyError:
        raise ValueError(f"unknown balancer {kind!r}; choose one of {', '.join(BALANCER_KINDS)}") from None
    return cls(**options)
