"""The sidecar on Consul (the project's Consul test agent over real HTTP)."""

from __future__ import annotations

import json
import signal
import time

from tests.helpers import http, wait_for

SENTINEL = "5e171ne1-70ke-4000-8000-5ecre7700000"


def consul_args(agent, *extra: str) -> tuple[str, ...]:
    return (
        "--registry",
        "consul",
        "--consul-addr",
        agent.addr,
        "--registry-ttl",
        "1",
        "--deregister-critical-after",
        "1",
        *extra,
    )


def service_of(agent, name: str) -> dict | None:
    for svc in agent.services().values():
        if svc["Service"] == name:
            return svc
    return None


def test_two_sidecars_on_consul_call_each_other(consul_agent, start_app, start_sidecar):
    a_app, b_app = start_app("alpha"), start_app("beta")
    a = start_sidecar(
        a_app.port, "--name", "alpha", "--tag", "v1", "--meta", "team=web", *consul_args(consul_agent)
    )
    b = start_sidecar(b_app.port, "--name", "beta", *consul_args(consul_agent))
    status, _, body = http("GET", f"{a.outbound}/beta/hi")
    assert status == 200 and json.loads(body)["app"] == "beta"
    status, _, body = http("GET", f"{b.outbound}/alpha/hi")
    assert status == 200 and json.loads(body)["app"] == "alpha"

    svc = service_of(consul_agent, "alpha")
    assert svc is not None
    assert svc["ID"] == f"alpha-127.0.0.1-{a.inbound_port}"
    assert svc["Address"] == "127.0.0.1" and svc["Port"] == a.inbound_port
    assert svc["Tags"] == ["v1"]
    assert svc["Meta"]["team"] == "web" and svc["Meta"]["app_port"] == str(a_app.port)
    assert "sidecar_version" in svc["Meta"]
    check = consul_agent.checks()[f"service:{svc['ID']}"]
    assert check["Status"] == "passing" and check["Type"] == "ttl"
    assert "HTTP GET /health: 200" in check["Output"]
    entries = consul_agent.health("alpha", passing=True)
    assert [e["Service"]["Port"] for e in entries] == [a.inbound_port]


def test_ttl_is_kept_fresh_and_app_death_turns_critical(consul_agent, start_app, start_sidecar):
    app = start_app("svc")
    sc = start_sidecar(app.port, "--name", "svc", *consul_args(consul_agent))
    caller_app = start_app("caller")
    caller = start_sidecar(caller_app.port, "--name", "caller", *consul_args(consul_agent))
    check_id = f"service:svc-127.0.0.1-{sc.inbound_port}"
    time.sleep(3)  # three TTLs: still passing only if refreshed on time
    assert consul_agent.checks()[check_id]["Status"] == "passing"
    assert http("GET", f"{caller.outbound}/svc/x")[0] == 200

    app.signal(signal.SIGKILL)
    app.wait(5)
    # (the check may be gone for a moment: critical longer than --deregister-critical-after
    # 1 s, the agent removes the instance and the sidecar registers it again)
    def status() -> str | None:
        return consul_agent.checks().get(check_id, {}).get("Status")

    outputs: list[str] = []

    def critical() -> bool:
        check = consul_agent.checks().get(check_id, {})
        outputs.append(check.get("Output", ""))
        return check.get("Status") == "critical"

    wait_for(critical, 20, what="critical in consul")
    assert "probe of" in outputs[-1]
    wait_for(
        lambda: http("GET", f"{caller.outbound}/svc/x")[1].get("X-Sidecar-Error") == "no_healthy_instance",
        20,
        what="peers stop routing",
    )
    start_app("svc", port=app.port)
    wait_for(lambda: status() == "passing", 20, what="passing again")
    wait_for(lambda: http("GET", f"{caller.outbound}/svc/x")[0] == 200, 20, what="peers route again")


def test_agent_restart_wipes_state_and_sidecar_registers_again(consul_agent, start_app, start_sidecar):
    app = start_app("svc")
    sc = start_sidecar(app.port, "--name", "svc", *consul_args(consul_agent))
    assert service_of(consul_agent, "svc") is not None
    consul_agent.wipe()
    assert service_of(consul_agent, "svc") is None
    wiped = time.monotonic()
    wait_for(lambda: service_of(consul_agent, "svc") is not None, 5, what="registered again")
    print(f"re-registered {time.monotonic() - wiped:.2f}s after the agent lost its state (TTL 1s)")
    assert time.monotonic() - wiped < 1.5
    assert "registering again" in sc.output()


def test_agent_down_keeps_known_endpoints(consul_agent, start_app, start_sidecar):
    app = start_app("svc")
    start_sidecar(app.port, "--name", "svc", *consul_args(consul_agent))
    caller_app = start_app("caller")
    caller = start_sidecar(caller_app.port, "--name", "caller", *consul_args(consul_agent))
    assert http("GET", f"{caller.outbound}/svc/x")[0] == 200
    for fault in ("refuse", "error500", "hang"):
        consul_agent.set_fault(fault)
        time.sleep(1.5)
        statuses = [http("GET", f"{caller.outbound}/svc/x")[0] for _ in range(5)]
        assert statuses == [200] * 5, (fault, statuses)
        assert caller.popen.poll() is None
        consul_agent.set_fault("none")
    upstream = caller.status()["upstreams"]["svc"]
    assert upstream["age_seconds"] is not None


def test_discovery_follows_consul_within_a_second(consul_agent, start_app, start_sidecar):
    app = start_app("svc")
    start_sidecar(app.port, "--name", "svc", *consul_args(consul_agent))
    caller_app = start_app("caller")
    caller = start_sidecar(caller_app.port, "--name", "caller", *consul_args(consul_agent))
    assert http("GET", f"{caller.outbound}/svc/x")[0] == 200
    other = start_app("svc")
    registration = {
        "ID": "svc-extra",
        "Name": "svc",
        "Address": "127.0.0.1",
        "Port": other.port,
        "Check": {"TTL": "30s", "Status": "passing"},
    }
    changed = time.monotonic()
    assert (
        http("PUT", f"{consul_agent.url}/v1/agent/service/register", json.dumps(registration).encode())[0]
        == 200
    )

    def seen() -> bool:
        return len(caller.status()["upstreams"]["svc"]["instances"]) == 2

    wait_for(seen, 5, interval=0.01, what="the new instance")
    latency = time.monotonic() - changed
    print(f"consul change -> outbound endpoint set: {latency * 1000:.0f} ms")
    assert latency < 1.0


def test_acl_denied_is_one_clear_error_and_no_crash(consul_agent_acl, start_app, start_sidecar):
    token = SENTINEL  # may read the catalog, may not register anything
    consul_agent_acl.add_token(secret=token, policy={"service_read": ["*"], "node_read": True})
    app = start_app("web")
    sc = start_sidecar(
        app.port,
        "--name",
        "web",
        *consul_args(consul_agent_acl),
        ready=False,
        env={"CONSUL_HTTP_TOKEN": token},
    )
    wait_for(lambda: "lacks service:write" in sc.output(), 10, what="the denial logged")
    time.sleep(2)
    # once for the registration and once for the certificate (both need service:write),
    # not once per retry
    denials = [line for line in sc.output().splitlines() if "lacks service:write" in line]
    assert len(denials) == 2, denials
    assert sum("sidecar.identity" in line for line in denials) == 1
    assert sc.popen.poll() is None
    assert http("GET", f"{sc.inbound}/still-serving")[0] == 200
    code, body = sc.ready()
    assert code == 503 and "not registered" in body["reason"]
    status_text = json.dumps(sc.status())
    assert token not in status_text and token not in sc.output()


def test_token_never_appears_in_logs_status_or_errors(consul_agent_acl, start_app, start_sidecar):
    consul_agent_acl.add_token(secret=SENTINEL, policy="management")
    app = start_app("web")
    sc = start_sidecar(
        app.port,
        "--name",
        "web",
        "--log-level",
        "debug",
        *consul_args(consul_agent_acl),
        env={"CONSUL_HTTP_TOKEN": SENTINEL},
    )
    http("GET", f"{sc.outbound}/web/x")
    http("GET", f"{sc.outbound}/nosuch/x")
    consul_agent_acl.set_fault("error500")
    time.sleep(1.5)
    consul_agent_acl.set_fault("refuse")
    time.sleep(1.5)
    consul_agent_acl.set_fault("none")
    everything = sc.output() + json.dumps(sc.status()) + http("GET", f"{sc.admin}/metrics")[2].decode()
    assert SENTINEL not in everything
    assert "answered 500" in sc.output()  # the failures were logged, without the token


def test_graceful_stop_deregisters_and_sigkill_is_removed_by_consul(consul_agent, start_app, start_sidecar):
    one, two = start_app("svc"), start_app("svc")
    graceful = start_sidecar(one.port, "--name", "svc", *consul_args(consul_agent))
    killed = start_sidecar(two.port, "--name", "svc", *consul_args(consul_agent))
    assert len(consul_agent.health("svc")) == 2
    graceful.signal(signal.SIGTERM)
    assert graceful.wait(15) == 0
    assert [e["Service"]["Port"] for e in consul_agent.health("svc")] == [killed.inbound_port]
    killed.signal(signal.SIGKILL)
    started = time.monotonic()
    wait_for(lambda: consul_agent.health("svc") == [], 10, what="consul removes the killed instance")
    print(f"SIGKILLed instance removed by consul after {time.monotonic() - started:.1f}s (TTL 1s + 1s)")
