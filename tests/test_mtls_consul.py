"""Sidecars on Consul's Connect CA (the project's Consul test agent over real HTTP): leaves
from the agent, Connect-native registrations, intentions deciding who may call whom while
traffic flows, and a root rotation under load."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

from tests.helpers import http, wait_for
from tests.test_consul_sidecar import consul_args, service_of


def intention(agent, source: str, destination: str, action: str | None) -> None:
    """Set (or, with None, delete) the intention source => destination, as an operator would."""
    url = f"{agent.url}/v1/connect/intentions/exact?source={source}&destination={destination}"
    if action is None:
        req = urllib.request.Request(url, method="DELETE")
    else:
        data = json.dumps({"Action": action, "Description": "test"}).encode()
        req = urllib.request.Request(url, data=data, method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def pair(consul_agent, start_app, start_sidecar):
    orders_app, web_app = start_app("orders"), start_app("web")
    orders = start_sidecar(orders_app.port, "--name", "orders", *consul_args(consul_agent))
    web = start_sidecar(web_app.port, "--name", "web", *consul_args(consul_agent))
    wait_for(lambda: http("GET", f"{web.outbound}/orders/warm")[0] == 200, 15, what="orders reachable")
    return orders, web


def test_consul_leaves_connect_native_and_intentions_while_traffic_flows(
    consul_agent, start_app, start_sidecar
):
    orders, web = pair(consul_agent, start_app, start_sidecar)
    identity = orders.status()["identity"]
    trust_domain = identity["identity"]["spiffe_id"].split("/")[2]
    assert trust_domain.endswith(".consul") and identity["source"]["kind"] == "consul"
    assert service_of(consul_agent, "orders")["Connect"] == {"Native": True}
    status, _, body = http("GET", f"{web.outbound}/orders/x")
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert status == 200 and seen["x-sidecar-caller"] == "web"
    assert seen["x-forwarded-client-cert"].endswith(f"URI=spiffe://{trust_domain}/ns/default/dc/dc1/svc/web")

    intention(consul_agent, "web", "orders", "deny")
    started = time.monotonic()
    wait_for(lambda: http("GET", f"{web.outbound}/orders/x")[0] == 403, 5, what="the deny intention applied")
    assert time.monotonic() - started < 3
    status, headers, body = http("GET", f"{web.outbound}/orders/x")
    assert headers["X-Sidecar-Error"] == "permission_denied" and "web" in json.loads(body)["message"]
    intention(consul_agent, "*", "orders", "deny")
    intention(consul_agent, "web", "orders", "allow")  # exact beats the wildcard
    wait_for(lambda: http("GET", f"{web.outbound}/orders/x")[0] == 200, 5, what="the allow intention applied")
    intention(consul_agent, "web", "orders", None)  # the wildcard deny is left
    wait_for(lambda: http("GET", f"{web.outbound}/orders/x")[0] == 403, 5, what="back to the wildcard")

    # Consul away: the last known intentions still decide (fail static)
    consul_agent.set_fault("refuse")
    try:
        time.sleep(1.5)  # the registration and the certificate watch see it fail meanwhile
        assert http("GET", f"{web.outbound}/orders/x")[0] == 403
    finally:
        consul_agent.clear_fault()
    # and once it is back, a change applies within seconds again
    intention(consul_agent, "web", "orders", "allow")
    wait_for(lambda: http("GET", f"{web.outbound}/orders/x")[0] == 200, 5, what="a change after the outage")


def test_a_root_rotation_under_load_fails_no_request(consul_agent, start_app, start_sidecar):
    orders, web = pair(consul_agent, start_app, start_sidecar)
    old_leaf = orders.status()["identity"]["identity"]["serial"]
    results: list[int] = []
    stop = time.monotonic() + 4.0

    def client() -> None:
        while time.monotonic() < stop:
            results.append(http("GET", f"{web.outbound}/orders/load")[0])

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    consul_agent.set_fault("rotate_root")
    for t in threads:
        t.join(30)
    assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}
    for sc in (orders, web):
        wait_for(
            lambda sc=sc: sc.status()["identity"]["rotations"] >= 1, 5, what="new leaf from the new root"
        )
    assert orders.status()["identity"]["identity"]["serial"] != old_leaf
    assert http("GET", f"{web.outbound}/orders/after")[0] == 200


def test_a_hung_agent_holds_up_neither_start_nor_plaintext_callers(consul_agent, start_app, start_sidecar):
    consul_agent.set_fault("hang")
    app = start_app("orders")
    began = time.monotonic()
    try:
        orders = start_sidecar(app.port, "--name", "orders", *consul_args(consul_agent), ready=False)
        assert time.monotonic() - began < 9  # the first certificate is waited for 5 s at most
        # permissive: a plaintext caller is served while there is no certificate yet
        assert http("GET", f"{orders.inbound}/plain")[0] == 200
        assert orders.ready()[0] == 503
    finally:
        consul_agent.clear_fault()
    wait_for(lambda: orders.ready()[0] == 200, 20, what="ready once the agent answers")
    assert orders.status()["identity"]["identity"]["valid"]
