"""The sidecar's Prometheus metrics, on a registry of their own (never the global one).

Labels stay bounded: methods fold into `read`/`write`, statuses into `2xx`..`5xx`, and
after `max_services` distinct service names further ones are counted as `other`, so a
caller that invents names cannot grow the series without bound.

The per-request series (requests, latency, active requests) are plain integers kept by
`RequestStats` and turned into metric families only when /metrics is scraped: the
client library's metric objects take a lock on every update, which costs more than the
rest of the bookkeeping of a proxied request. Everything runs on the event loop thread.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Seconds; a sidecar hop is usually milliseconds, a slow upstream up to the 30 s default timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OTHER = "other"


def method_class(method: str) -> str:
    """`read` for GET/HEAD/OPTIONS, `write` for every other method."""
    return "read" if method.upper() in READ_METHODS else "write"


def status_class(status: int) -> str:
    """`1xx`..`5xx`, or `other` for a value outside HTTP's range."""
    return f"{status // 100}xx" if 100 <= status <= 599 else OTHER


# bound on the label-child caches (methods and services come from requests)
_MAX_CACHED = 4096


class _InFlight:
    """A reusable `with` block that counts a request as active in one cell."""

    __slots__ = ("cell",)

    def __init__(self) -> None:
        self.cell = [0]

    def __enter__(self) -> None:
        self.cell[0] += 1

    def __exit__(self, *exc: object) -> None:
        self.cell[0] -= 1


class _Latency:
    """One histogram series: per-bucket (not cumulative) counts, the last one +Inf."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


_BOUNDS = [floatToGoString(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
REQUEST_LABELS = ["direction", "service", "method", "status"]


class RequestStats:
    """The per-request series, as plain numbers; a collector for the registry."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str, str], list[int]] = {}
        self.latency: dict[tuple[str, str], _Latency] = {}
        self.active: dict[tuple[str, str], _InFlight] = {}
        self.grpc: dict[tuple[str, str, str], list[int]] = {}

    def counter(self, labels: tuple[str, str, str, str]) -> list[int]:
        cell = self.counts.get(labels)
        if cell is None:
            cell = self.counts[labels] = [0]
        return cell

    def histogram(self, labels: tuple[str, str]) -> _Latency:
        series = self.latency.get(labels)
        if series is None:
            series = self.latency[labels] = _Latency()
        return series

    def gauge(self, labels: tuple[str, str]) -> _InFlight:
        series = self.active.get(labels)
        if series is None:
            series = self.active[labels] = _InFlight()
        return series

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sidecar_requests",
            "Requests handled, by direction, service, method class and status class.",
            labels=REQUEST_LABELS,
        )
        for shape, cell in list(self.counts.items()):
            requests.add_metric(shape, cell[0])
        latency = HistogramMetricFamily(
            "sidecar_request_duration_seconds",
            "Time from receiving a request to the end of its response, by direction and service.",
            labels=["direction", "service"],
        )
        for pair, series in list(self.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(_BOUNDS, series.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(pair, buckets, series.total)
        active = GaugeMetricFamily(
            "sidecar_active_requests",
            "Requests in flight, by direction and service.",
            labels=["direction", "service"],
        )
        for pair, gauge in list(self.active.items()):
            active.add_metric(pair, gauge.cell[0])
        grpc = CounterMetricFamily(
            "sidecar_grpc_requests",
            "gRPC calls handled, by direction, service and grpc-status (none: ended without one).",
            labels=["direction", "service", "grpc_status"],
        )
        for triple, cell in list(self.grpc.items()):
            grpc.add_metric(triple, cell[0])
        yield requests
        yield latency
        yield active
        yield grpc


class Metrics:
    """Every metric of issue 6; `render()` answers /metrics.

    `on_scrape(callback)` registers a function run just before each render, to copy
    state that lives elsewhere (app health, registry, endpoint counts) into gauges.
    """

    def __init__(self, *, process: bool = True, max_services: int = 200) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_services = max_services
        self._services: set[str] = set()
        # series cached per request shape: folding labels costs more than counting
        self._observed: dict[tuple[str, str, str, int], tuple[list[int], _Latency]] = {}
        self._gauges: dict[tuple[str, str], _InFlight] = {}
        self.stats = RequestStats()
        self._scrape_hooks: list[Callable[[], None]] = []
        r = self.registry
        self.up = Gauge("sidecar_up", "1 while the sidecar runs.", registry=r)
        self.up.set(1)
        r.register(self.stats)
        self.retries = Counter("sidecar_retries", "Retries sent, by service.", ["service"], registry=r)
        self.budget_exhausted = Counter(
            "sidecar_retry_budget_exhausted",
            "Retries refused because the retry budget was spent, by service.",
            ["service"],
            registry=r,
        )
        self.ejections = Counter(
            "sidecar_ejections", "Endpoints ejected as outliers, by service.", ["service"], registry=r
        )
        self.endpoints = Gauge(
            "sidecar_endpoints", "Healthy endpoints known per service.", ["service"], registry=r
        )
        self.endpoints_ejected = Gauge(
            "sidecar_endpoints_ejected", "Endpoints currently ejected per service.", ["service"], registry=r
        )
        self.registry_up = Gauge(
            "sidecar_registry_up", "1 when the last exchange with the service registry succeeded.", registry=r
        )
        self.registry_last_sync = Gauge(
            "sidecar_registry_last_sync_timestamp_seconds",
            "Unix time of the last successful exchange with the service registry.",
            registry=r,
        )
        self.app_healthy = Gauge(
            "sidecar_app_healthy", "1 when the app passes its health checks.", registry=r
        )
        self.denied = Counter(
            "sidecar_inbound_denied",
            "Inbound requests refused before the app: permission_denied or mtls_required.",
            ["code"],
            registry=r,
        )
        self.identity_expiry = Gauge(
            "sidecar_identity_expiry_seconds",
            "Seconds until this sidecar's certificate expires (negative: expired).",
            registry=r,
        )
        self.identity_rotations = Gauge(
            "sidecar_identity_rotations", "Certificates swapped in since start.", registry=r
        )
        if process:
            ProcessCollector(registry=r)

    def __repr__(self) -> str:
        return f"<Metrics services={len(self._services)} hooks={len(self._scrape_hooks)}>"

    def service_label(self, service: str) -> str:
        """`service` itself, or `other` once `max_services` names are in use."""
        if service in self._services:
            return service
        if len(self._services) >= self.max_services:
            return OTHER
        self._services.add(service)
        return service

    # -- per request -------------------------------------------------------------------

    def observe_request(self, direction: str, service: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency. `direction`: inbound or outbound."""
        key = (direction, service, method, status)
        series = self._observed.get(key)
        if series is None:
            label = self.service_label(service)
            series = (
                self.stats.counter((direction, label, method_class(method), status_class(status))),
                self.stats.histogram((direction, label)),
            )
            if len(self._observed) < _MAX_CACHED:
                self._observed[key] = series
        series[0][0] += 1
        series[1].observe(seconds)

    def observe_grpc(self, direction: str, service: str, grpc_status: str | None) -> None:
        """Count one finished gRPC call by its status (0-16, or "none")."""
        status = (
            grpc_status
            if grpc_status is not None and grpc_status.isdigit() and len(grpc_status) <= 2
            else "none"
        )
        key = (direction, self.service_label(service), status)
        cell = self.stats.grpc.get(key)
        if cell is None:
            cell = self.stats.grpc[key] = [0]
        cell[0] += 1

    def in_flight(self, direction: str, service: str) -> _InFlight:
        """Counts a request as active for the duration of the `with` block."""
        key = (direction, service)
        gauge = self._gauges.get(key)
        if gauge is None:
            gauge = self.stats.gauge((direction, self.service_label(service)))
            if len(self._gauges) < _MAX_CACHED:
                self._gauges[key] = gauge
        return gauge

    def inc_retry(self, service: str) -> None:
        self.retries.labels(self.service_label(service)).inc()

    def inc_budget_exhausted(self, service: str) -> None:
        self.budget_exhausted.labels(self.service_label(service)).inc()

    def inc_ejection(self, service: str) -> None:
        self.ejections.labels(self.service_label(service)).inc()

    def inc_denied(self, code: str) -> None:
        self.denied.labels(code).inc()

    # -- state ---------------------------------------------------------------------------

    def set_identity(self, seconds_to_expiry: float | None, rotations: int) -> None:
        if seconds_to_expiry is not None:
            self.identity_expiry.set(seconds_to_expiry)
        self.identity_rotations.set(rotations)

    def set_endpoints(self, service: str, healthy: int, ejected: int = 0) -> None:
        label = self.service_label(service)
        self.endpoints.labels(label).set(healthy)
        self.endpoints_ejected.labels(label).set(ejected)

    def set_registry(self, up: bool, last_sync: float | None) -> None:
        """Registry reachability and the Unix time of its last good answer (None: never)."""
        self.registry_up.set(1 if up else 0)
        if last_sync is not None:
            self.registry_last_sync.set(last_sync)

    def set_app_healthy(self, healthy: bool) -> None:
        self.app_healthy.set(1 if healthy else 0)

    def on_scrape(self, callback: Callable[[], None]) -> None:
        """Run `callback` before every render (to refresh gauges from live state)."""
        self._scrape_hooks.append(callback)

    def render(self) -> tuple[bytes, str]:
        """(body, Content-Type) of the Prometheus text exposition."""
        for hook in self._scrape_hooks:
            try:
                hook()
            except Exception:  # a broken hook must not take /metrics down with it
                log.exception("metrics scrape hook %r failed", hook)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
