"""Panic routing with real sidecars on the local registry: when no instance of a service
passes its health checks, callers route to all of its registered, live instances, and a
callee's sidecar lets requests marked `X-Sidecar-Panic: 1` past its app-health gate."""

from __future__ import annotations

import json

from sidecar.discovery import PANIC_HEADER
from tests.helpers import App, Sidecar, http, wait_for

WAIT = 30.0  # generous: a loaded 2-core machine runs these


def headers_of(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def upstream(caller: Sidecar, name: str) -> dict:
    return caller.status()["upstreams"].get(name, {})


def start_two_and_a_caller(start_app, start_sidecar) -> tuple[App, App, Sidecar, Sidecar, Sidecar]:
    one, two = start_app("pay"), start_app("pay")
    a = start_sidecar(one.port, "--name", "pay", "--unhealthy-threshold", "2")
    b = start_sidecar(two.port, "--name", "pay", "--unhealthy-threshold", "2")
    caller_app = start_app("caller")
    caller = start_sidecar(caller_app.port, "--name", "caller")
    wait_for(
        lambda: (
            http("GET", f"{caller.outbound}/pay/x")[0] == 200
            and len(upstream(caller, "pay").get("instances", [])) == 2
        ),
        WAIT,
        what="the caller seeing both instances",
    )
    return one, two, a, b, caller


def make_both_unhealthy(one: App, two: App, a: Sidecar, b: Sidecar) -> None:
    for app in (one, two):
        assert http("POST", f"{app.url}/_health?ok=0")[0] == 200
    wait_for(lambda: a.ready()[0] == 503 and b.ready()[0] == 503, WAIT, what="both sidecars unready")
    for app in (one, two):  # the apps keep serving; only their health checks fail
        assert http("GET", f"{app.url}/still-serving")[0] == 200


def test_all_instances_critical_panic_routes_to_all_and_the_gate_lets_it_through(
    start_app, start_sidecar, registry_path
):
    one, two, a, b, caller = start_two_and_a_caller(start_app, start_sidecar)
    make_both_unhealthy(one, two, a, b)

    # The callee's gate: a plain request is refused, a request marked by a caller in panic
    # reaches the app, which never sees the header.
    for sc, app in ((a, one), (b, two)):
        status, headers, body = http("GET", f"{sc.inbound}/x")
        assert status == 503 and headers["X-Sidecar-Error"] == "app_unhealthy", body
        status, headers, body = http("GET", f"{sc.inbound}/x", headers={PANIC_HEADER: "0"})
        assert status == 503 and headers["X-Sidecar-Error"] == "app_unhealthy", body
        status, headers, body = http("GET", f"{sc.inbound}/x", headers={PANIC_HEADER: "1"})
        assert status == 200, body
        assert json.loads(body)["pid"] == app.pid
        assert "x-sidecar-panic" not in headers_of(body)
        assert "X-Sidecar-Error" not in headers

    # Discovery hands out both (critical) instances instead of nothing.
    inbound_ports = sorted([a.inbound_port, b.inbound_port])
    wait_for(lambda: upstream(caller, "pay").get("panic") is True, WAIT, what="the caller in panic")
    seen = upstream(caller, "pay")
    assert seen["instances"] == []
    assert sorted(i["port"] for i in seen["critical"]) == inbound_ports
    # The caller logs entering panic once.
    assert caller.output().count("panic: routing to all") == 1, caller.output()

    # One instance passes again: only it is routed to, and panic ends.
    assert http("POST", f"{one.url}/_health?ok=1")[0] == 200
    wait_for(lambda: a.ready()[0] == 200, WAIT, what="the first sidecar ready again")
    wait_for(lambda: upstream(caller, "pay").get("panic") is False, WAIT, what="the caller leaving panic")
    assert [i["port"] for i in upstream(caller, "pay")["instances"]] == [a.inbound_port]
    pids = {json.loads(http("GET", f"{caller.outbound}/pay/x")[2])["pid"] for _ in range(6)}
    assert pids == {one.pid}
    assert "leaving panic" in caller.output()


def test_caller_outbound_still_succeeds_when_every_instance_is_critical(start_app, start_sidecar):
    one, two, a, b, caller = start_two_and_a_caller(start_app, start_sidecar)
    make_both_unhealthy(one, two, a, b)
    wait_for(lambda: upstream(caller, "pay").get("panic") is True, WAIT, what="the caller in panic")
    pids = set()
    for _ in range(10):
        status, headers, body = http("GET", f"{caller.outbound}/pay/x")
        assert status == 200, (status, headers, body)
        assert "x-sidecar-panic" not in headers_of(body)
        pids.add(json.loads(body)["pid"])
    assert pids <= {one.pid, two.pid} and pids
