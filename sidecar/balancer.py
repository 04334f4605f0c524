"""Picking one endpoint of a service, with live per-endpoint stats, passive outlier ejection
and half-open probing of ejected endpoints.

Rules of this file:
- `acquire` is the only way a request gets an endpoint; every lease is given back exactly
  once with `release(lease, outcome)` (a second release is ignored), so `outstanding`
  stays true even when the endpoint set changes while requests are in flight;
- stats are keyed by instance id and follow the set that discovery hands in: ids still
  present keep all their state (counters, failure window and score, ejection and probe
  state), ids that left are dropped (their open leases keep working and touch only the
  dropped stats), and an id that comes back starts afresh;
- a failure is a connect failure, a reset (before or after sending), a timeout, an answer
  a peer sidecar gave without forwarding, or a 5xx answer; "cancelled" is neither a success nor a failure and
  changes nothing but `outstanding` (and frees a probe slot); any other answer is a success;
- an endpoint in rotation is ejected when its last `failures` outcomes all failed, or when
  at least `failure_ratio` of its last `failure_window` outcomes in rotation failed (once
  it has `failure_window_min` of them); the ejection lasts `base_ejection * times ejected`
  (capped at `max_ejection`), and never more than `max_ejection_percent` of a service's
  instances are ejected at once (one held back by that cap is ejected on its next failure
  once there is room); an ejection clears the failure window and the run of failures;
- an ejected endpoint is probed: `probe_delay` after the ejection (doubled for each
  ejection since its last long good spell, and after each failed probe; never past the
  ejection's end) it may take exactly one request at a time, the probe, which the next
  `acquire` that may go to it gives it before any other choice (`pick`, which leases
  nothing, never probes); a probe that succeeds ends the ejection and clears the
  endpoint's failure state, one that fails makes the next probe wait longer, and any
  release of the probe's lease (whatever the outcome, "cancelled" included) frees the
  slot; while ejected, other requests' outcomes count only in its totals and failure
  score; without a successful probe the endpoint comes back when its period ends;
- when every endpoint is ejected (with no probe due) or excluded, the pick falls back to
  all of them rather than failing;
- P2C compares load = outstanding requests + failure score: each failure adds 1, the
  score halves every `failure_half_life` seconds and counts as 0 once under 0.5; so a
  failed request weighs as much right after it failed as while it was in flight (failing
  fast never makes an endpoint lighter), while a success lightens it at once; round
  robin ignores the score;
- a pick scans at most SCAN_LIMIT endpoints (a few random draws beyond that), reads the
  clock once and allocates at most the candidate list and P2C's sample of two;
- a release that is not "cancelled" reads the clock once and adds to its endpoint's
  `successes` or `failures` and to its `latency` average (time since the acquire): the
  per-instance figures of the dashboard, at the cost of two float operations;
- nothing here does I/O or reads the clock except through the injected `now`, but for
  `describe`, which also shows the end of an ejection as a wall-clock time.
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
# A failure score under this counts as no score at all (so one old failure does not keep
# losing every tie of P2C's comparison).
SCORE_FLOOR = 0.5
# The weight of the newest answer in an endpoint's latency average (for the dashboard):
# about the last ten answers count.
LATENCY_WEIGHT = 0.1

# What became of a leased request: an HTTP status when the endpoint answered (5xx counts
# as a failure), a failure kind when it did not, "cancelled" when the caller went away
# or its own deadline cut the attempt (neither a success nor a failure of the endpoint).
Outcome = FailureKind | Literal["success", "cancelled"] | int

EjectionReason = Literal["consecutive_failures", "failure_ratio"]


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
    ejection_reason: EjectionReason | None = None  # why the latest ejection happened
    requests: int = 0
    failures: int = 0
    successes: int = 0
    # seconds from acquire to release of its answered requests (not the cancelled ones),
    # an exponentially weighted average (LATENCY_WEIGHT); 0.0 before the first
    latency: float = 0.0
    # the last `failure_window` outcomes in rotation, one bit each (1: failed), newest lowest
    recent: int = 0
    recent_count: int = 0
    recent_failures: int = 0
    # P2C's failure score: `score` at `score_at`, decaying; counts as 0 from `score_until`
    score: float = 0.0
    score_at: float = 0.0
    score_until: float = -math.inf
    # half-open probing while ejected
    probing: bool = False  # a probe's lease is open
    probe_at: float = 0.0  # when the next probe may start
    probe_wait: float = 0.0  # the wait before that probe; doubles after a failed one

    def ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    def clear_failures(self) -> None:
        self.consecutive_failures = 0
        self.recent = self.recent_count = self.recent_failures = 0


@dataclass(slots=True)
class Lease:
    """One request's hold on one endpoint, from `acquire` to `release`."""

    service: str
    instance: Instance
    stats: EndpointStats
    released: bool = False
    probe: bool = False  # this request is the ejected endpoint's probe
    started: float = 0.0  # when it was acquired, on the balancer's clock

    def __repr__(self) -> str:
        state = "released" if self.released else "open"
        probe = " probe" if self.probe else ""
        return f"<Lease {self.service} -> {self.instance.id}{probe} {state}>"


@dataclass(slots=True)
class _Service:
    instances: Sequence[Instance] = ()
    ids: tuple[str, ...] = ()
    stats: dict[str, EndpointStats] = field(default_factory=dict)  # in the order of `ids`
    outstanding: int = 0
    cursor: int = 0  # round robin's position


def is_failure(outcome: Outcome) -> bool:
    """Whether `outcome` counts against the endpoint for ejection."""
    if isinstance(outcome, int):
        return outcome >= 500
    return outcome not in ("success", "cancelled")


class Balancer:
    """Per-service endpoint picking over live stats; subclasses choose among candidates.

    `failures`: consecutive failures that eject an endpoint. `failure_ratio`,
    `failure_window`, `failure_window_min`: also eject it when at least that share of its
    last `failure_window` outcomes failed, counted once it has `failure_window_min` of
    them (`failure_ratio=None`: only consecutive failures eject). `base_ejection` and
    `max_ejection`: the first period and the cap (seconds). `max_ejection_percent`: the
    share of a service's instances that may be ejected at once (rounded down, so a
    service with one instance is never ejected). `probe_delay`: seconds after an ejection
    before its first probe (None: no probes, an ejection ends only by time).
    `failure_half_life`: seconds for P2C's failure score to halve. `max_outstanding`: the
    per-service concurrency limit beyond which `acquire` raises ServiceOverloaded (None:
    no limit). `on_eject(service, instance, seconds)` is called on each ejection (for
    metrics/logs).
    """

    kind: BalancerKind

    def __init__(
        self,
        *,
        failures: int = 5,
        failure_ratio: float | None = 0.5,
        failure_window: int = 20,
        failure_window_min: int = 10,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejection_percent: float = 50.0,
        probe_delay: float | None = 1.0,
        failure_half_life: float = 1.0,
        max_outstanding: int | None = None,
        now: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_eject: Callable[[str, Instance, float], None] | None = None,
    ) -> None:
        if failure_ratio is not None and not 0.0 < failure_ratio <= 1.0:
            raise ValueError("failure_ratio must be in (0, 1], or None")
        if not 1 <= failure_window_min <= failure_window:
            raise ValueError("need 1 <= failure_window_min <= failure_window")
        if probe_delay is not None and not probe_delay > 0.0:
            raise ValueError("probe_delay must be positive, or None")
        if not failure_half_life > 0.0:
            raise ValueError("failure_half_life must be positive")
        self.failures = failures
        self.failure_ratio = failure_ratio
        self.failure_window = failure_window
        self.failure_window_min = failure_window_min
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejection_percent = max_ejection_percent
        self.probe_delay = probe_delay
        self.failure_half_life = failure_half_life
        self.max_outstanding = max_outstanding
        self.now = now
        self.rng = rng or random.Random()
        self.on_eject = on_eject
        self.ejections_total = 0
        self._services: dict[str, _Service] = {}
        self._window_mask = (1 << failure_window) - 1
        self._decay = math.log(2.0) / failure_half_life  # score(t) = score * exp(-decay * t)

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
        concurrency limit. Give the lease back with `release`. The lease of an ejected
        endpoint whose probe is due is that probe (`lease.probe`).
        """
        svc = self._sync(service, instances)
        if self.max_outstanding is not None and svc.outstanding >= self.max_outstanding:
            raise ServiceOverloaded(
                f"service {service!r} has {svc.outstanding} requests in flight (limit {self.max_outstanding})"
            )
        now = self.now()
        stats = self._pick(service, svc, exclude, now, True)
        until = stats.ejected_until
        probe = until is not None and now < until and not stats.probing and now >= stats.probe_at
        if probe:
            stats.probing = True
        stats.outstanding += 1
        stats.requests += 1
        svc.outstanding += 1
        return Lease(service, stats.instance, stats, probe=probe, started=now)

    def release(self, lease: Lease, outcome: Outcome) -> None:
        """Give `lease` back with what became of the request; updates ejection state."""
        if lease.released:
            return
        lease.released = True
        stats = lease.stats
        if lease.probe:
            stats.probing = False  # first of all: nothing may keep the slot taken
        stats.outstanding -= 1
        svc = self._services.get(lease.service)
        if svc is not None:
            svc.outstanding -= 1
        if outcome == "cancelled":
            return
        failed = is_failure(outcome)
        now = self.now()
        latency, elapsed = stats.latency, now - lease.started
        stats.latency = elapsed if latency == 0.0 else latency + LATENCY_WEIGHT * (elapsed - latency)
        until = stats.ejected_until
        if not failed:
            stats.successes += 1
            if until is None:  # the common case: a success, never ejected
                stats.consecutive_failures = 0
                self._record(stats, 0)
                return
        else:
            stats.failures += 1
            self._add_score(stats, now)
        if until is not None and now < until:  # ejected: only its probe counts
            if lease.probe:
                if failed:
                    self._probe_failed(stats, now)
                else:
                    self._restore(stats, now)
            return
        if not failed:
            stats.consecutive_failures = 0
            self._record(stats, 0)
            return
        stats.consecutive_failures += 1
        self._record(stats, 1)
        reason = self._ejection_reason(stats)
        if reason is None:
            return
        if svc is None or svc.stats.get(stats.instance.id) is not stats:
            return  # the endpoint left the set while this request was in flight
        self._eject(lease.service, svc, stats, now, reason)

    def pick(self, name: str, instances: Sequence[Instance], exclude: Collection[str] = ()) -> Instance:
        """Choose an endpoint without counting a request against it (never a probe)."""
        return self._pick(name, self._sync(name, instances), exclude, self.now(), False).instance

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

    def _pick(
        self, service: str, svc: _Service, exclude: Collection[str], now: float, probes: bool
    ) -> EndpointStats:
        """The endpoint for the next request: a due probe first (when `probes`), else a
        choice among the endpoints in rotation, else the fallback."""
        if len(svc.ids) > SCAN_LIMIT:
            # Large services: a few random (or next-in-turn) draws instead of a scan, so
            # the cost of a pick does not grow with the number of instances.
            drawn = self._draw(service, svc, exclude, now, probes)
            if drawn is not None:
                return drawn
        candidates = []
        for stats in svc.stats.values():
            if stats.instance.id in exclude:
                continue
            until = stats.ejected_until
            if until is None or now >= until:
                candidates.append(stats)
            elif probes and not stats.probing and now >= stats.probe_at:
                return stats  # its probe is due
        if not candidates:
            every = list(svc.stats.values())
            candidates = [s for s in every if s.instance.id not in exclude] or every
        return self._choose(service, candidates, now)

    def _choose(self, service: str, candidates: list[EndpointStats], now: float) -> EndpointStats:
        raise NotImplementedError

    def _draw(
        self, service: str, svc: _Service, exclude: Collection[str], now: float, probes: bool
    ) -> EndpointStats | None:
        """A pick without scanning every endpoint, or None to fall back to the scan."""
        return None

    def _record(self, stats: EndpointStats, failed: int) -> None:
        """Slide the failure window by one outcome (1: failed)."""
        if stats.recent_count == self.failure_window:
            stats.recent_failures -= (stats.recent >> (self.failure_window - 1)) & 1
        else:
            stats.recent_count += 1
        stats.recent = ((stats.recent << 1) | failed) & self._window_mask
        stats.recent_failures += failed

    def _ejection_reason(self, stats: EndpointStats) -> EjectionReason | None:
        if stats.consecutive_failures >= self.failures:
            return "consecutive_failures"
        ratio = self.failure_ratio
        if (
            ratio is not None
            and stats.recent_count >= self.failure_window_min
            and stats.recent_failures >= ratio * stats.recent_count
        ):
            return "failure_ratio"
        return None

    def _add_score(self, stats: EndpointStats, now: float) -> None:
        score = 1.0
        if now < stats.score_until:
            score += stats.score * math.exp((stats.score_at - now) * self._decay)
        stats.score = score
        stats.score_at = now
        # when score * exp(-decay * t) falls to SCORE_FLOOR
        stats.score_until = now + math.log(score / SCORE_FLOOR) / self._decay

    def _score(self, stats: EndpointStats, now: float) -> float:
        if now >= stats.score_until:
            return 0.0
        return stats.score * math.exp((stats.score_at - now) * self._decay)

    def _load(self, stats: EndpointStats, now: float) -> float:
        """Outstanding requests plus the failure score: what P2C compares."""
        if now >= stats.score_until:
            return stats.outstanding
        return stats.outstanding + stats.score * math.exp((stats.score_at - now) * self._decay)

    def _eject(
        self, service: str, svc: _Service, stats: EndpointStats, now: float, reason: EjectionReason
    ) -> None:
        allowed = math.floor(len(svc.ids) * self.max_ejection_percent / 100.0)
        ejected = sum(1 for s in svc.stats.values() if s.ejected(now))
        if ejected >= allowed:
            return  # stays in rotation; ejected as soon as there is room
        if stats.ejected_until is not None and now - stats.ejected_until >= self.max_ejection:
            stats.ejections = 0  # behaved for a long while since its last return: start over
        stats.ejections += 1
        period = min(self.max_ejection, self.base_ejection * stats.ejections)
        stats.ejected_until = now + period
        stats.ejection_reason = reason
        if self.probe_delay is None:
            stats.probe_wait = period
        else:
            stats.probe_wait = min(period, self.probe_delay * 2.0 ** min(stats.ejections - 1, 30))
        stats.probe_at = now + stats.probe_wait
        stats.clear_failures()
        self.ejections_total += 1
        if self.on_eject is not None:
            self.on_eject(service, stats.instance, period)

    @staticmethod
    def _probe_failed(stats: EndpointStats, now: float) -> None:
        assert stats.ejected_until is not None
        stats.probe_wait *= 2.0
        stats.probe_at = min(now + stats.probe_wait, stats.ejected_until)

    @staticmethod
    def _restore(stats: EndpointStats, now: float) -> None:
        """A probe succeeded: back in rotation now, with a clean failure state."""
        stats.ejected_until = now  # the ejection ended now (the multiplier's reset counts from here)
        stats.probe_wait = 0.0
        stats.clear_failures()
        stats.score = 0.0
        stats.score_until = -math.inf

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
        """Per-endpoint state of `service` for /status (JSON-able).

        `health` is "healthy" or "ejected"; while ejected, `probing` tells whether its
        probe is in flight and `next_probe_in_seconds` when the next one may start (0:
        the next pick). `recent_failure_ratio` is over the last `recent_requests`
        outcomes in rotation (None before any); `failure_score` is P2C's penalty.
        """
        svc = self._services.get(service)
        if svc is None:
            return []
        now = self.now()
        out: list[dict[str, object]] = []
        for instance_id in svc.ids:
            s = svc.stats[instance_id]
            ejected = s.ejected(now)
            remaining = (s.ejected_until - now) if ejected and s.ejected_until is not None else None
            next_probe = None
            if ejected and not s.probing and s.probe_at < (s.ejected_until or 0.0):
                next_probe = round(max(0.0, s.probe_at - now), 3)
            out.append(
                {
                    "id": instance_id,
                    "endpoint": s.instance.endpoint,
                    "health": "ejected" if ejected else "healthy",
                    "outstanding": s.outstanding,
                    "consecutive_failures": s.consecutive_failures,
                    "recent_requests": s.recent_count,
                    "recent_failures": s.recent_failures,
                    "recent_failure_ratio": (
                        round(s.recent_failures / s.recent_count, 3) if s.recent_count else None
                    ),
                    "failure_score": round(self._score(s, now), 3),
                    "ejected_until": None if remaining is None else round(time.time() + remaining, 3),
                    "ejected_for_seconds": None if remaining is None else round(remaining, 3),
                    "ejection_reason": s.ejection_reason if ejected else None,
                    "probing": ejected and s.probing,
                    "next_probe_in_seconds": next_probe,
                    "ejections": s.ejections,
                    "requests": s.requests,
                    "failures": s.failures,
                    "successes": s.successes,
                    "latency_ms": round(s.latency * 1000.0, 3) if s.successes + s.failures else None,
                }
            )
        return out


class P2C(Balancer):
    """Power of two choices: of two random candidates, the one with the lower load
    (outstanding requests plus the decaying failure score)."""

    kind: BalancerKind = "p2c"

    def _choose(self, service: str, candidates: list[EndpointStats], now: float) -> EndpointStats:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return b if self._load(b, now) < self._load(a, now) else a

    def _draw(
        self, service: str, svc: _Service, exclude: Collection[str], now: float, probes: bool
    ) -> EndpointStats | None:
        ids, all_stats, first = svc.ids, svc.stats, None
        for _ in range(DRAWS):
            stats = all_stats[ids[self.rng.randrange(len(ids))]]
            if stats.instance.id in exclude:
                continue
            until = stats.ejected_until
            if until is not None and now < until:
                if probes and not stats.probing and now >= stats.probe_at:
                    return stats  # its probe is due
                continue
            if first is None:
                first = stats
            elif stats is not first:
                return stats if self._load(stats, now) < self._load(first, now) else first
        return None


class RoundRobin(Balancer):
    """One counter per service; tolerant of the instance list changing between calls."""

    kind: BalancerKind = "round_robin"

    def _choose(self, service: str, candidates: list[EndpointStats], now: float) -> EndpointStats:
        svc = self._services[service]
        n = svc.cursor
        svc.cursor = n + 1
        return candidates[n % len(candidates)]

    def _draw(
        self, service: str, svc: _Service, exclude: Collection[str], now: float, probes: bool
    ) -> EndpointStats | None:
        ids = svc.ids
        for _ in range(DRAWS):
            stats = svc.stats[ids[svc.cursor % len(ids)]]
            svc.cursor += 1
            if stats.instance.id in exclude:
                continue
            until = stats.ejected_until
            if until is None or now >= until:
                return stats
            if probes and not stats.probing and now >= stats.probe_at:
                return stats  # its probe is due
        return None


def make_balancer(kind: BalancerKind = "p2c", **options: Any) -> Balancer:
    """A balancer by its flag name; `options` are Balancer's keyword arguments."""
    classes: dict[str, type[Balancer]] = {"p2c": P2C, "round_robin": RoundRobin}
    try:
        cls = classes[kind]
    except KeyError:
        raise ValueError(f"unknown balancer {kind!r}; choose one of {', '.join(BALANCER_KINDS)}") from None
    return cls(**options)
