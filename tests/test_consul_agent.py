"""The Consul test agent over real HTTP: the behaviours micro-sidecar relies on, as Consul documents them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.consul_agent import BackgroundAgent, Filter, FilterError, format_duration, parse_duration

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def index(self) -> int:
        return int(self.headers["X-Consul-Index"])


def call(
    agent: BackgroundAgent,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Reply:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(agent.url + path, data=data, method=method, headers=dict(headers or {}))
    if token:
        request.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers, err.read())


def register(
    agent: BackgroundAgent,
    body: dict[str, Any],
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    return call(agent, "PUT", "/v1/agent/service/register", body, token=token, headers=headers)


def later(delay: float, fn: Any) -> threading.Timer:
    timer = threading.Timer(delay, fn)
    timer.start()
    return timer


# -- registration shapes --------------------------------------------------------------------


def test_register_accepts_camel_and_lower_case_and_reports_consul_shapes(consul_agent):
    assert register(consul_agent, {"Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["v1"]}).status == 200
    lower = {"name": "api", "id": "api-1", "address": "127.0.0.2", "port": 9090, "meta": {"team": "x"}}
    assert register(consul_agent, lower).status == 200

    services = call(consul_agent, "GET", "/v1/agent/services").json()
    assert services == consul_agent.services()
    assert services["web-1"] == {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["v1"],
        "Meta": {},
        "Port": 8080,
        "Address": "",
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "Datacenter": "dc1",
    }
    assert services["api-1"]["Address"] == "127.0.0.2"
    assert services["api-1"]["Meta"] == {"team": "x"}
    one = call(consul_agent, "GET", "/v1/agent/service/api-1")
    assert one.json()["ContentHash"] == one.headers["X-Consul-ContentHash"]


def test_ttl_check_starts_critical_unless_status_given_and_ids_follow_consul(consul_agent):
    register(consul_agent, {"Name": "web", "ID": "w1", "Check": {"TTL": "10s"}})
    register(
        consul_agent,
        {
            "name": "web",
            "id": "w2",
            "checks": [{"ttl": "10s", "status": "passing"}, {"TTL": "10s", "Notes": "n"}],
        },
    )
    checks = consul_agent.checks()
    assert set(checks) == {"service:w1", "service:w2:1", "service:w2:2"}
    assert checks["service:w1"]["Status"] == "critical"
    assert checks["service:w1"]["Name"] == "Service 'web' check"
    assert checks["service:w2:1"]["Status"] == "passing"
    assert checks["service:w2:2"]["Notes"] == "n"
    assert checks["service:w1"]["Type"] == "ttl"


def test_reregistering_an_id_replaces_the_service_but_keeps_check_state(consul_agent):
    register(consul_agent, {"Name": "web", "ID": "w1", "Tags": ["a"], "Check": {"TTL": "10s"}})
    assert call(consul_agent, "PUT", "/v1/agent/check/pass/service:w1").status == 200
    register(consul_agent, {"Name": "web", "ID": "w1", "Tags": ["b"], "Port": 81, "Check": {"TTL": "10s"}})
    service = consul_agent.services()["w1"]
    assert (service["Tags"], service["Port"]) == (["b"], 81)
    assert consul_agent.checks()["service:w1"]["Status"] == "passing"
    assert len(consul_agent.services()) == 1


def test_durations_follow_go_syntax(consul_agent):
    assert parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5 and format_duration(90) == "1m30s"
    with pytest.raises(ValueError, match="missing unit"):
        parse_duration("5")
    body = {"Name": "web", "Check": {"TTL": "1m30s", "DeregisterCriticalServiceAfter": "1h"}}
    assert register(consul_agent, body).status == 200
    definition = consul_agent.checks()["service:web"]["Definition"]
    assert (definition["TTL"], definition["DeregisterCriticalServiceAfter"]) == ("1m30s", "1h0m0s")
    reply = register(consul_agent, {"Name": "web", "Check": {"TTL": "soon"}})
    assert (reply.status, reply.text) == (400, 'Request decode failed: time: invalid duration "soon"')


# -- check updates and expiry -------------------------------------------------------------------


def test_ttl_updates_set_output_and_expiry_says_ttl_expired(consul_agent):
    register(consul_agent, {"Name": "web", "Check": {"TTL": "300ms"}})
    assert call(consul_agent, "PUT", "/v1/agent/check/warn/service:web?note=slow").status == 200
    check = consul_agent.checks()["service:web"]
    assert (check["Status"], check["Output"]) == ("warning", "slow")

    reply = call(
        consul_agent, "PUT", "/v1/agent/check/update/service:web", {"Status": "passing", "Output": "ok"}
    )
    assert reply.status == 200
    assert consul_agent.checks()["service:web"]["Status"] == "passing"

    check = consul_agent.wait_for(lambda a: (c := a.checks()["service:web"])["Status"] == "critical" and c)
    assert check["Output"] == "TTL expired (last output before timeout follows): ok"

    register(consul_agent, {"Name": "db", "Check": {"TTL": "200ms"}})
    check = consul_agent.wait_for(lambda a: (c := a.checks()["service:db"])["Output"] and c)
    assert (check["Status"], check["Output"]) == ("critical", "TTL expired")


def test_check_update_rejects_unknown_status(consul_agent):
    register(consul_agent, {"Name": "web", "Check": {"TTL": "10s"}})
    reply = call(consul_agent, "PUT", "/v1/agent/check/update/service:web", {"Status": "bogus"})
    assert (reply.status, reply.text) == (400, "Invalid check status: 'bogus'")


def test_http_checks_run_on_their_interval_against_loopback(consul_agent):
    leader = f"{consul_agent.url}/v1/status/leader"
    register(consul_agent, {"Name": "up", "Check": {"HTTP": leader, "Interval": "100ms"}})
    register(consul_agent, {"Name": "down", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "100ms"}})
    register(consul_agent, {"Name": "far", "Check": {"HTTP": "http://192.0.2.1/", "Interval": "100ms"}})
    up = consul_agent.wait_for(lambda a: (c := a.checks()["service:up"])["Status"] == "passing" and c)
    assert up["Output"].startswith(f"HTTP GET {leader}: 200 OK Output: ")
    down = consul_agent.wait_for(lambda a: (c := a.checks()["service:down"])["Output"] and c)
    assert down["Status"] == "critical" and "connection refused" in down["Output"]
    far = consul_agent.wait_for(lambda a: (c := a.checks()["service:far"])["Output"] and c)
    assert far["Status"] == "critical" and "only dials loopback" in far["Output"]

    consul_agent.set_fault("error500")
    consul_agent.wait_for(lambda a: a.checks()["service:up"]["Status"] == "critical")
    consul_agent.set_fault("none")
    consul_agent.wait_for(lambda a: a.checks()["service:up"]["Status"] == "passing")


def test_deregister_critical_service_after_really_deregisters(consul_agent):
    body = {"Name": "web", "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "300ms"}}
    register(consul_agent, body)
    register(consul_agent, {"Name": "keep", "Check": {"TTL": "10s", "Status": "passing"}})
    start = time.monotonic()
    consul_agent.wait_for(lambda a: "web" not in a.services(), timeout=3)
    assert time.monotonic() - start >= 0.25
    assert set(consul_agent.services()) == {"keep"}
    assert "service:web" not in consul_agent.checks()


# -- errors ---------------------------------------------------------------------------------------


def test_errors_are_plain_text_with_consuls_status_codes(consul_agent):
    reply = call(consul_agent, "PUT", "/v1/agent/check/pass/nope")
    assert (reply.status, reply.text) == (
        404,
        'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.',
    )
    assert reply.headers["Content-Type"].startswith("text/plain")
    reply = call(consul_agent, "PUT", "/v1/agent/service/deregister/web")
    assert (reply.status, reply.text) == (
        404,
        'Unknown service ID "web". Ensure that the service ID is passed, not the service name.',
    )
    reply = call(consul_agent, "PUT", "/v1/agent/service/register", b"{not json")
    assert reply.status == 400 and reply.text.startswith("Request decode failed: ")
    reply = register(consul_agent, {"ID": "x", "Port": 1})
    assert (reply.status, reply.text) == (400, "Missing service name")
    reply = register(consul_agent, {"Name": "web", "Check": {"Name": "no type"}})
    assert (reply.status, reply.text) == (400, "Invalid check: TTL must be > 0 for TTL checks")
    reply = call(
        consul_agent, "PUT", "/v1/agent/check/register", {"Name": "c", "TTL": "1s", "ServiceID": "ghost"}
    )
    assert (reply.status, reply.text) == (404, 'ServiceID "ghost" does not exist')
    reply = call(consul_agent, "GET", "/v1/agent/service/register")
    assert (reply.status, reply.text) == (405, "method GET not allowed")

    register(consul_agent, {"Name": "web", "Check": {"HTTP": consul_agent.url, "Interval": "10s"}})
    reply = call(consul_agent, "PUT", "/v1/agent/check/pass/service:web")
    assert (reply.status, reply.text) == (500, 'CheckID "service:web" does not have associated TTL')


# -- health and catalog -------------------------------------------------------------------------


def test_health_service_shapes_passing_and_tags(consul_agent):
    register(consul_agent, {"Name": "web", "ID": "w1", "Tags": ["a", "b"], "Check": {"TTL": "10s"}})
    register(consul_agent, {"Name": "web", "ID": "w2", "Tags": ["a"], "Port": 82, "Check": {"TTL": "10s"}})
    call(consul_agent, "PUT", "/v1/agent/check/pass/service:w2")

    entries = call(consul_agent, "GET", "/v1/health/service/web").json()
    assert [e["Service"]["ID"] for e in entries] == ["w1", "w2"]
    entry = entries[1]
    assert entry["Node"]["Node"] == consul_agent.node_name and entry["Node"]["Address"] == "127.0.0.1"
    assert entry["Node"]["Datacenter"] == "dc1"
    assert {k: entry["Service"][k] for k in ("ID", "Service", "Tags", "Address", "Port", "Meta")} == {
        "ID": "w2",
        "Service": "web",
        "Tags": ["a"],
        "Address": "",
        "Port": 82,
        "Meta": {},
    }
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "service:w2"]

    passing = call(consul_agent, "GET", "/v1/health/service/web?passing").json()
    assert [e["Service"]["ID"] for e in passing] == ["w2"]
    assert passing == consul_agent.health("web", passing=True)
    tagged = call(consul_agent, "GET", "/v1/health/service/web?tag=a&tag=b").json()
    assert [e["Service"]["ID"] for e in tagged] == ["w1"]
    assert call(consul_agent, "GET", "/v1/health/service/web?dc=dc2").status == 500

    checks = call(consul_agent, "GET", "/v1/health/checks/web").json()
    assert [c["CheckID"] for c in checks] == ["service:w1", "service:w2"]
    node = call(consul_agent, "GET", f"/v1/health/node/{consul_agent.node_name}").json()
    assert {c["CheckID"] for c in node} == {"serfHealth", "service:w1", "service:w2"}
    critical = call(consul_agent, "GET", "/v1/health/state/critical").json()
    assert [c["CheckID"] for c in critical] == ["service:w1"]


def test_catalog_lists_the_node_and_its_services(consul_agent):
    register(consul_agent, {"Name": "web", "Tags": ["v1"], "Port": 80})
    assert call(consul_agent, "GET", "/v1/catalog/datacenters").json() == ["dc1"]
    assert call(consul_agent, "GET", "/v1/catalog/services").json() == {"consul": [], "web": ["v1"]}
    nodes = call(consul_agent, "GET", "/v1/catalog/nodes").json()
    assert [n["Node"] for n in nodes] == [consul_agent.node_name]
    service = call(consul_agent, "GET", "/v1/catalog/service/web").json()
    assert [(s["ServiceID"], s["ServicePort"], s["Address"]) for s in service] == [("web", 80, "127.0.0.1")]
    node = call(consul_agent, "GET", f"/v1/catalog/node/{consul_agent.node_name}").json()
    assert set(node["Services"]) == {"consul", "web"}
    reply = call(consul_agent, "PUT", "/v1/catalog/register", {"Node": "n1", "Address": "10.0.0.1"})
    assert reply.json() is True
    assert [n["Node"] for n in call(consul_agent, "GET", "/v1/catalog/nodes").json()] == [
        consul_agent.node_name,
        "n1",
    ]
    assert call(consul_agent, "GET", "/v1/status/leader").json() == "127.0.0.1:8300"
    assert call(consul_agent, "GET", "/v1/status/peers").json() == ["127.0.0.1:8300"]


def test_filter_expressions():
    assert Filter('"keep" in Tags and Port != 80').matches({"Tags": ["keep"], "Port": 81})
    assert Filter("Service.Meta.env == `prod`").matches({"Service": {"Meta": {"env": "prod"}}})
    assert not Filter("not (Name is not empty)").matches({"Name": "x"})
    with pytest.raises(FilterError):
        Filter("not a valid expression((")


# -- blocking queries -------------------------------------------------------------------------


def test_blocking_query_returns_when_the_result_changes(consul_agent):
    first = call(consul_agent, "GET", "/v1/health/service/web")
    assert first.json() == [] and first.index >= 1
    assert first.headers["X-Consul-KnownLeader"] == "true" and first.headers["X-Consul-LastContact"] == "0"
    later(0.3, lambda: register(consul_agent, {"Name": "web"}))
    start = time.monotonic()
    second = call(consul_agent, "GET", f"/v1/health/service/web?index={first.index}&wait=5s")
    assert 0.2 < time.monotonic() - start < 2.0
    assert second.index > first.index
    assert [e["Service"]["ID"] for e in second.json()] == ["web"]


def test_blocking_query_ignores_other_services_and_times_out_with_the_same_index(consul_agent):
    register(consul_agent, {"Name": "web"})
    first = call(consul_agent, "GET", "/v1/health/service/web")
    later(0.1, lambda: register(consul_agent, {"Name": "other"}))
    start = time.monotonic()
    second = call(consul_agent, "GET", f"/v1/health/service/web?index={first.index}&wait=400ms")
    assert time.monotonic() - start >= 0.39
    assert second.index == first.index
    assert second.json() == first.json()


def test_index_is_never_zero(consul_agent):
    reply = call(consul_agent, "GET", "/v1/kv/missing")
    assert reply.status == 404 and reply.index >= 1
    consul_agent.reset_index()
    assert call(consul_agent, "GET", "/v1/catalog/services").index >= 1
    assert call(consul_agent, "GET", "/v1/health/service/none").index >= 1


# -- KV -------------------------------------------------------------------------------------------


def test_kv_put_get_cas_flags_recurse_keys_and_delete(consul_agent):
    assert call(consul_agent, "PUT", "/v1/kv/app/a?flags=42", b"one").json() is True
    entry = call(consul_agent, "GET", "/v1/kv/app/a").json()[0]
    assert entry["Value"] == "b25l" and entry["Flags"] == 42 and entry["LockIndex"] == 0
    assert entry["CreateIndex"] == entry["ModifyIndex"]
    assert call(consul_agent, "GET", "/v1/kv/app/a?raw").body == b"one"

    assert call(consul_agent, "PUT", "/v1/kv/app/a?cas=0", b"x").json() is False
    assert call(consul_agent, "PUT", f"/v1/kv/app/a?cas={entry['ModifyIndex'] - 1}", b"x").json() is False
    assert call(consul_agent, "PUT", f"/v1/kv/app/a?cas={entry['ModifyIndex']}", b"two").json() is True
    assert call(consul_agent, "PUT", "/v1/kv/app/b?cas=0", b"").json() is True
    updated = call(consul_agent, "GET", "/v1/kv/app/a").json()[0]
    assert updated["CreateIndex"] == entry["CreateIndex"] and updated["ModifyIndex"] > entry["ModifyIndex"]
    assert updated["Flags"] == 0

    tree = call(consul_agent, "GET", "/v1/kv/app/?recurse").json()
    assert [(e["Key"], e["Value"]) for e in tree] == [("app/a", "dHdv"), ("app/b", None)]
    call(consul_agent, "PUT", "/v1/kv/app/sub/c", b"3")
    assert call(consul_agent, "GET", "/v1/kv/app/?keys&separator=/").json() == ["app/a", "app/b", "app/sub/"]

    assert call(consul_agent, "DELETE", f"/v1/kv/app/a?cas={updated['ModifyIndex'] - 1}").json() is False
    assert call(consul_agent, "DELETE", "/v1/kv/app?recurse").json() is True
    assert call(consul_agent, "GET", "/v1/kv/app/?recurse").status == 404
    assert consul_agent.kv() == {}


# -- ACLs -----------------------------------------------------------------------------------------


def test_acl_tokens_unknown_anonymous_and_limited(consul_agent_acl):
    agent = consul_agent_acl
    reply = register(agent, {"Name": "web"}, token="not-a-token")
    assert (reply.status, reply.text) == (403, "ACL not found")
    reply = register(agent, {"Name": "web"})
    assert reply.status == 403
    assert reply.text.startswith(
        "Permission denied: anonymous token lacks permission 'service:write' on \"web\""
    )

    assert register(agent, {"Name": "web", "Check": {"TTL": "10s"}}, token=agent.token).status == 200
    accessor = agent.add_token("reader", {"service_read": ["*"], "node_read": True})
    assert call(agent, "GET", "/v1/health/service/web", token="reader").json()[0]["Service"]["ID"] == "web"
    reply = register(agent, {"Name": "web"}, token="reader")
    assert (reply.status, reply.text) == (
        403,
        f"Permission denied: token with AccessorID '{accessor}' lacks permission 'service:write' on \"web\"",
    )
    reply = call(agent, "PUT", "/v1/agent/check/pass/service:web", token="reader")
    assert reply.status == 403 and "'service:write'" in reply.text

    agent.add_token("web-writer", {"service_write": ["web"]})
    assert (
        register(agent, {"Name": "web", "Port": 1}, headers={"Authorization": "Bearer web-writer"}).status
        == 200
    )
    assert call(agent, "PUT", "/v1/agent/check/pass/service:web?token=web-writer").status == 200
    assert register(agent, {"Name": "api"}, token="web-writer").status == 403

    # Reads are filtered, not refused: the anonymous token sees nothing.
    assert call(agent, "GET", "/v1/agent/services").json() == {}
    assert call(agent, "GET", "/v1/health/service/web").json() == []
    assert call(agent, "GET", "/v1/agent/self").status == 403

    agent.add_token("kv-reader", {"key_read": ["app/*"]})
    call(agent, "PUT", "/v1/kv/app/x", b"1", token=agent.token)
    assert call(agent, "GET", "/v1/kv/app/x", token="kv-reader").status == 200
    assert call(agent, "PUT", "/v1/kv/app/x", b"2", token="kv-reader").status == 403


# -- faults ---------------------------------------------------------------------------------------


def test_fault_refuse_really_refuses_connections_then_recovers(consul_agent):
    register(consul_agent, {"Name": "web"})
    port = consul_agent.port
    consul_agent.set_fault("refuse")
    with pytest.raises(urllib.error.URLError) as caught:
        call(consul_agent, "GET", "/v1/agent/services", timeout=1)
    assert isinstance(caught.value.reason, ConnectionRefusedError)
    consul_agent.set_fault("none")
    assert consul_agent.port == port
    assert set(call(consul_agent, "GET", "/v1/agent/services").json()) == {"web"}


def test_fault_error500_answers_every_call_with_plain_text(consul_agent):
    consul_agent.set_fault("error500")
    for method, path in (("GET", "/v1/status/leader"), ("PUT", "/v1/agent/service/register")):
        reply = call(consul_agent, method, path, {"Name": "web"})
        assert reply.status == 500 and reply.text == "No cluster leader"
        assert reply.headers["Content-Type"].startswith("text/plain")
    consul_agent.set_fault("clear")
    assert call(consul_agent, "GET", "/v1/status/leader").status == 200


def test_fault_hang_accepts_and_never_answers(consul_agent):
    consul_agent.set_fault("hang")
    start = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        call(consul_agent, "GET", "/v1/status/leader", timeout=0.3)
    assert time.monotonic() - start >= 0.29
    consul_agent.set_fault("none")
    assert call(consul_agent, "GET", "/v1/status/leader").status == 200
    # Left hanging on purpose: stopping the fixture must still be quick.
    consul_agent.set_fault("hang")
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        call(consul_agent, "GET", "/v1/status/leader", timeout=0.1)


def test_fault_wipe_forgets_everything_and_the_index_keeps_rising(consul_agent):
    register(consul_agent, {"Name": "web", "Check": {"TTL": "10s"}})
    call(consul_agent, "PUT", "/v1/kv/k", b"v")
    before = call(consul_agent, "GET", "/v1/catalog/services").index
    consul_agent.set_fault("wipe")
    assert consul_agent.services() == {} and consul_agent.checks() == {} and consul_agent.kv() == {}
    reply = call(consul_agent, "PUT", "/v1/agent/check/pass/service:web")
    assert reply.status == 404
    after = call(consul_agent, "GET", "/v1/catalog/services")
    assert after.index > before and after.json() == {"consul": []}


def test_fault_reset_index_moves_the_index_back_and_wakes_blocked_queries(consul_agent):
    for i in range(5):
        register(consul_agent, {"Name": "web", "Tags": [str(i)]})
    high = call(consul_agent, "GET", "/v1/health/service/web").index
    later(0.2, lambda: consul_agent.set_fault("reset_index"))
    start = time.monotonic()
    reply = call(consul_agent, "GET", f"/v1/health/service/web?index={high}&wait=5s")
    assert time.monotonic() - start < 2
    assert 1 <= reply.index < high
    assert [e["Service"]["ID"] for e in reply.json()] == ["web"]


async def test_async_clients_can_use_the_fixture_too(consul_agent):
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{consul_agent.url}/v1/agent/service/register", json={"Name": "web"}) as resp:
            assert resp.status == 200
        async with session.get(f"{consul_agent.url}/v1/health/service/web") as resp:
            assert int(resp.headers["X-Consul-Index"]) >= 1
            assert [e["Service"]["ID"] for e in await resp.json()] == ["web"]


def test_cli_prints_its_address_serves_control_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.consul_agent",
            "--port",
            "0",
            "--control-port",
            "0",
            "--acl-token",
            "root",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first.startswith("consul test agent listening on 127.0.0.1:")
        port = int(first.rsplit(":", 1)[1])
        control = int(proc.stdout.readline().strip().rsplit(":", 1)[1])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/agent/service/register",
            data=b'{"Name": "web"}',
            method="PUT",
            headers={"X-Consul-Token": "root"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        fault = urllib.request.Request(f"http://127.0.0.1:{control}/fault/refuse", method="PUT")
        with urllib.request.urlopen(fault, timeout=5) as response:
            assert json.load(response)["fault"] == "refuse"
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status/leader", timeout=1)
        with urllib.request.urlopen(f"http://127.0.0.1:{control}/state", timeout=5) as response:
            assert set(json.load(response)["services"]) == {"web"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
