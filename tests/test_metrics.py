import sys

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import Metrics, method_class, status_class


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def test_classes():
    assert [method_class(m) for m in ("GET", "head", "OPTIONS")] == ["read"] * 3
    assert [method_class(m) for m in ("POST", "PUT", "DELETE", "PATCH", "TRACE")] == ["write"] * 5
    assert [status_class(s) for s in (101, 200, 204, 302, 404, 503)] == [
        "1xx",
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
    ]
    assert status_class(0) == "other" and status_class(600) == "other"


def test_request_counters_match_what_was_observed():
    m = Metrics(process=False)
    sent = [
        ("outbound", "orders", "GET", 200),
        ("outbound", "orders", "GET", 200),
        ("outbound", "orders", "HEAD", 204),
        ("outbound", "orders", "POST", 201),
        ("outbound", "orders", "POST", 503),
        ("outbound", "users", "DELETE", 404),
        ("inbound", "web", "GET", 500),
    ]
    for direction, service, method, status in sent:
        m.observe_request(direction, service, method, status, 0.012)
    got = samples(m)

    def count(**labels):
        return got.get(("sidecar_requests_total", tuple(sorted(labels.items()))))

    assert count(direction="outbound", service="orders", method="read", status="2xx") == 3
    assert count(direction="outbound", service="orders", method="write", status="2xx") == 1
    assert count(direction="outbound", service="orders", method="write", status="5xx") == 1
    assert count(direction="outbound", service="users", method="write", status="4xx") == 1
    assert count(direction="inbound", service="web", method="read", status="5xx") == 1
    total = sum(v for (name, _), v in got.items() if name == "sidecar_requests_total")
    assert total == len(sent)
    latency = ("sidecar_request_duration_seconds_count", (("direction", "outbound"), ("service", "orders")))
    assert got[latency] == 5
    bucket = (
        "sidecar_request_duration_seconds_bucket",
        (("direction", "outbound"), ("le", "0.025"), ("service", "orders")),
    )
    assert got[bucket] == 5
    assert got[("sidecar_request_duration_seconds_sum", latency[1])] == pytest.approx(0.06)


def test_active_requests_gauge():
    m = Metrics(process=False)
    with m.in_flight("outbound", "orders"):
        with m.in_flight("outbound", "orders"):
            assert value(m, "sidecar_active_requests", direction="outbound", service="orders") == 2
        assert value(m, "sidecar_active_requests", direction="outbound", service="orders") == 1
    with pytest.raises(RuntimeError), m.in_flight("outbound", "orders"):
        raise RuntimeError("boom")
    assert value(m, "sidecar_active_requests", direction="outbound", service="orders") == 0


def test_retries_budget_and_ejections():
    m = Metrics(process=False)
    for _ in range(3):
        m.inc_retry("orders")
    m.inc_budget_exhausted("orders")
    m.inc_ejection("orders")
    m.inc_ejection("orders")
    assert value(m, "sidecar_retries_total", service="orders") == 3
    assert value(m, "sidecar_retry_budget_exhausted_total", service="orders") == 1
    assert value(m, "sidecar_ejections_total", service="orders") == 2


def test_state_gauges_and_scrape_hooks():
    m = Metrics(process=False)
    state = {"healthy": False, "endpoints": 3}
    m.on_scrape(lambda: m.set_app_healthy(state["healthy"]))
    m.on_scrape(lambda: m.set_endpoints("orders", state["endpoints"], 1))
    m.set_registry(True, 1_700_000_000.5)
    assert value(m, "sidecar_app_healthy") == 0
    assert value(m, "sidecar_endpoints", service="orders") == 3
    assert value(m, "sidecar_endpoints_ejected", service="orders") == 1
    assert value(m, "sidecar_registry_up") == 1
    assert value(m, "sidecar_registry_last_sync_timestamp_seconds") == 1_700_000_000.5
    assert value(m, "sidecar_up") == 1
    state.update(healthy=True, endpoints=2)
    m.set_registry(False, None)  # a failed sync keeps the last good time
    assert value(m, "sidecar_app_healthy") == 1
    assert value(m, "sidecar_endpoints", service="orders") == 2
    assert value(m, "sidecar_registry_up") == 0
    assert value(m, "sidecar_registry_last_sync_timestamp_seconds") == 1_700_000_000.5


def test_a_broken_scrape_hook_does_not_break_render(caplog):
    m = Metrics(process=False)

    def broken():
        raise KeyError("gone")

    m.on_scrape(broken)
    m.set_app_healthy(True)
    assert value(m, "sidecar_app_healthy") == 1
    assert "scrape hook" in caplog.text


def test_service_label_cardinality_is_bounded():
    m = Metrics(process=False, max_services=2)
    for name in ("a", "b", "c", "d", "a"):
        m.observe_request("outbound", name, "GET", 200, 0.001)
    got = samples(m)
    services = {dict(labels)["service"] for (name, labels) in got if name == "sidecar_requests_total"}
    assert services == {"a", "b", "other"}
    labels = {"direction": "outbound", "method": "read", "service": "other", "status": "2xx"}
    assert value(m, "sidecar_requests_total", **labels) == 2


@pytest.mark.skipif(sys.platform != "linux", reason="process metrics read /proc")
def test_process_metrics_on_its_own_registry():
    m = Metrics()
    got = samples(m)
    assert any(name == "process_resident_memory_bytes" for name, _ in got)
    assert any(name == "process_cpu_seconds_total" for name, _ in got)
    # never the global registry: two instances coexist and the global one stays clean
    Metrics()
    assert REGISTRY.get_sample_value("sidecar_up") is None


def test_repr():
    m = Metrics(process=False)
    m.observe_request("inbound", "web", "GET", 200, 0.001)
    m.on_scrape(lambda: None)
    assert repr(m) == "<Metrics services=1 hooks=1>"
