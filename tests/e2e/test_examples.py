"""End to end: the Node ("greeter") and Ruby ("fortune") examples calling each other by name.

Each app runs under its own sidecar in supervisor mode (`micro-sidecar ... -- cmd`), on
free loopback ports, once with the local (SQLite) registry and once with the Consul test
agent; an app that finds its port taken is started again on another. Nothing here talks
to an app directly: every request goes through a sidecar, as mesh traffic would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from sidecar.registry.local import LocalRegistry
from tests.helpers import ROOT, Sidecar, http, start_supervised, wait_for

pytestmark = pytest.mark.e2e

NODE_SERVER = ROOT / "examples" / "node" / "server.js"
RUBY_RUN = ROOT / "examples" / "ruby" / "run.sh"

_missing = [tool for tool in ("node", "ruby", "puma") if shutil.which(tool) is None]
if not (ROOT / "examples" / "node" / "node_modules" / "express").is_dir():
    _missing.append("examples/node/node_modules (npm ci)")
if _missing and not os.environ.get("MICRO_SIDECAR_REQUIRE_E2E"):
    pytest.skip(
        f"end-to-end tests need {', '.join(_missing)}: run scripts/install-test-deps "
        "(set MICRO_SIDECAR_REQUIRE_E2E=1 to fail instead of skipping)",
        allow_module_level=True,
    )

# Health settings for every sidecar here: probe every 0.2 s (the helper's default), give a
# probe 0.5 s, flip to unhealthy after 2 failures in a row.
HEALTH_ARGS = ("--health-timeout", "0.5", "--unhealthy-threshold", "2")
# How long peers may take to see an instance go: the health thresholds (2 failed probes of
# at most 0.2 + 0.5 s) plus registry propagation, with room for a loaded 2-core machine.
NOTICE_WITHIN = 5.0
# A sidecar's own error answer is local work: it must not wait on a dead upstream.
FAST = 1.0


@dataclass
class Registry:
    """Sidecar flags for one registry, and a look into it that does not go through a sidecar."""

    args: tuple[str, ...]
    instance_ids: Callable[[str], list[str]]  # service name -> registered instance ids


@dataclass
class Mesh:
    """The two services and how to (re)start them."""

    registry: Registry
    start: Callable[..., None]
    services: dict[str, Sidecar] = field(default_factory=dict)

    @property
    def greeter(self) -> Sidecar:
        return self.services["greeter"]

    @property
    def fortune(self) -> Sidecar:
        return self.services["fortune"]


@pytest.fixture(params=["local", "consul"])
def registry(request, registry_path) -> Registry:
    if request.param == "local":

        def local_ids(name: str) -> list[str]:
            rows = asyncio.run(LocalRegistry(registry_path).all_instances())
            return [str(row["id"]) for row in rows if row["name"] == name]

        return Registry(args=(), instance_ids=local_ids)

    agent = request.getfixturevalue("consul_agent")

    def consul_ids(name: str) -> list[str]:
        return [sid for sid, svc in agent.services().items() if svc["Service"] == name]

    return Registry(args=("--registry", "consul", "--consul-addr", agent.addr), instance_ids=consul_ids)


def _kill_leftover_app(pid: int) -> None:
    """SIGKILL an app's process group if the app outlived its sidecar (a failed test)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return
    pgrp = int(stat.rsplit(")", 1)[1].split()[2])
    if pgrp == pid:  # still the group leader we started, not a recycled pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGCONT)
            os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def mesh(procs, registry_path, registry) -> Iterator[Mesh]:
    if _missing:  # and MICRO_SIDECAR_REQUIRE_E2E is set, or the module would have been skipped
        pytest.fail(f"MICRO_SIDECAR_REQUIRE_E2E is set but {', '.join(_missing)} missing", pytrace=False)
    commands = {
        "greeter": ["node", str(NODE_SERVER)],
        "fortune": [str(RUBY_RUN)],
    }
    sidecars: list[Sidecar] = []
    app_pids: list[int] = []

    def launcher(name: str) -> Callable[[int], Sidecar]:
        def launch(app_port: int) -> Sidecar:
            sidecar = Sidecar(
                app_port,
                "--name",
                name,
                *HEALTH_ARGS,
                *registry.args,
                registry_path=registry_path,
                command=commands[name],
            )
            procs.append(sidecar)
            sidecars.append(sidecar)
            m.services[name] = sidecar
            return sidecar

        return launch

    def start(*names: str) -> None:
        """Start the named services (all at once), then wait until each is ready with its app
        listening. The app binds the port its sidecar was given (PORT): when another process
        took that port first, the service is started again on another one."""
        for sidecar in start_supervised([launcher(name) for name in names], timeout=30):
            app_pids.append(sidecar.status()["app"]["pid"])

    m = Mesh(registry=registry, start=start)
    try:
        start("greeter", "fortune")
        yield m
    finally:
        for sidecar in reversed(sidecars):
            sidecar.stop()
        # pytest shows this only when the test failed: what each sidecar and its app said
        for sidecar in sidecars:
            lines = sidecar.output().splitlines()
            print(f"--- sidecar pid {sidecar.pid} (last 40 of {len(lines)} lines):", *lines[-40:], sep="\n")
        for pid in app_pids:
            _kill_leftover_app(pid)


def request_id() -> str:
    return f"e2e-{uuid.uuid4()}"


def get(url: str, rid: str | None = None, timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    status, headers, body = http("GET", url, headers={"X-Request-Id": rid} if rid else None, timeout=timeout)
    try:
        return status, headers, json.loads(body)
    except ValueError:
        return status, headers, body


def sidecar_error(headers: dict[str, str]) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == "x-sidecar-error"), None)


def wait_until_reachable(caller: Sidecar, service: str, path: str, timeout: float = 15.0) -> None:
    """Until `caller`'s outbound reaches `service` (discovery may lag a registration)."""
    wait_for(
        lambda: get(f"{caller.outbound}/{service}{path}")[0] == 200,
        timeout,
        interval=0.1,
        what=f"{service} reachable from the sidecar at {caller.outbound}",
    )


def test_node_and_ruby_call_each_other_by_name_with_one_request_id(mesh: Mesh) -> None:
    # node -> ruby: greeter's /ask-ruby fetches $MICRO_SIDECAR_OUTBOUND/fortune/fortune
    rid = request_id()
    status, headers, body = get(f"{mesh.greeter.inbound}/ask-ruby", rid)
    assert status == 200, body
    assert body["requestId"] == rid  # what greeter saw
    assert body["fortuneStatus"] == 200
    assert body["fortune"]["service"] == "fortune"
    assert body["fortune"]["requestId"] == rid  # what fortune saw, two sidecars later
    assert headers.get("X-Request-Id") == rid

    # ruby -> node: fortune's /ask-node uses Net::HTTP with the outbound listener as proxy
    rid = request_id()
    status, headers, body = get(f"{mesh.fortune.inbound}/ask-node", rid)
    assert status == 200, body
    assert body["requestId"] == rid
    assert body["greeterStatus"] == 200
    assert body["greeter"]["service"] == "greeter"
    assert body["greeter"]["message"] == "Hello, fortune!"
    assert body["greeter"]["requestId"] == rid
    assert headers.get("X-Request-Id") == rid

    # both calls went sidecar to sidecar over mutual TLS, neither app changed: each inbound
    # sidecar logged the caller its certificate named
    for callee, caller in ((mesh.fortune, "greeter"), (mesh.greeter, "fortune")):
        wait_for(lambda: f'"caller":"{caller}"' in callee.output(), 5, what=f"{caller} in the access log")
        identity = callee.status()["identity"]
        assert identity["mtls"] == "permissive" and identity["identity"]["valid"]


def call_fortune(greeter: Sidecar, since: float) -> Answer:
    """One call to fortune through greeter's outbound listener, as greeter's app makes it."""
    sent = time.monotonic()
    status, headers, body = get(f"{greeter.outbound}/fortune/fortune", timeout=10)
    by = body.get("sidecar") if isinstance(body, dict) else None
    return Answer(sent - since, status, sidecar_error(headers), by, time.monotonic() - sent)


@dataclass
class Answer:
    at: float  # seconds since the fault
    status: int
    error: str | None  # X-Sidecar-Error: set when a sidecar answered, not the app
    by: str | None  # which sidecar answered
    took: float


def test_hung_ruby_app_gets_fast_503_within_health_thresholds_then_recovers(mesh: Mesh) -> None:
    greeter, fortune = mesh.greeter, mesh.fortune
    wait_until_reachable(greeter, "fortune", "/fortune")
    puma_pid = fortune.status()["app"]["pid"]

    # Freeze the app: its port still accepts connections, but it answers nothing, not even
    # the sidecar's probes. Its sidecar stays up and must report it unhealthy.
    os.kill(puma_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(
            lambda: not greeter.status()["upstreams"]["fortune"]["instances"],
            NOTICE_WITHIN,
            interval=0.05,
            what="greeter's sidecar to drop the hung fortune instance",
        )
        noticed = time.monotonic() - stopped_at
        answer = call_fortune(greeter, stopped_at)
        # No instance of fortune passes, so greeter's sidecar routes to the critical one
        # anyway (the panic rule); fortune's sidecar, whose app does not even answer its
        # probes, turns it away at once, and greeter relays that labelled answer.
        assert (answer.status, answer.error, answer.by) == (503, "app_unhealthy", "fortune"), answer
        assert answer.took < FAST, answer
        assert fortune.popen.poll() is None  # a hung app is unhealthy, not gone
        assert fortune.ready()[0] == 503
    finally:
        os.kill(puma_pid, signal.SIGCONT)
    print(f"hung fortune noticed by greeter's sidecar after {noticed:.2f}s")

    wait_until_reachable(greeter, "fortune", "/fortune")
    rid = request_id()
    status, _, body = get(f"{greeter.inbound}/ask-ruby", rid)
    assert status == 200, body
    assert body["fortune"]["requestId"] == rid


def test_killed_ruby_app_gets_fast_errors_then_works_after_restart(mesh: Mesh) -> None:
    greeter, fortune = mesh.greeter, mesh.fortune
    wait_until_reachable(greeter, "fortune", "/fortune")
    puma_pid = fortune.status()["app"]["pid"]

    os.kill(puma_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    answers: list[Answer] = []

    def failing() -> bool:
        answers.append(call_fortune(greeter, killed_at))
        return answers[-1].status != 200

    wait_for(failing, NOTICE_WITHIN, interval=0.02, what="calls to the killed fortune failing")
    # Supervisor mode: the app ended, so its sidecar drains, deregisters and exits with the
    # app's status (128 + SIGKILL, as a shell reports it).
    assert fortune.wait(15) == 128 + signal.SIGKILL
    assert "app exited" in fortune.output()
    assert mesh.registry.instance_ids("fortune") == []

    # Once fortune's sidecar is gone, greeter's sidecar answers for fortune itself, at once:
    # 404 unknown_service when the only instance deregistered (503 no_healthy_instance
    # while the registry still lists it as critical).
    def answered_by_greeter() -> bool:
        answer = call_fortune(greeter, killed_at)
        answers.append(answer)
        return answer.by == "greeter" and (answer.status, answer.error) in {
            (404, "unknown_service"),
            (503, "no_healthy_instance"),
        }

    wait_for(answered_by_greeter, NOTICE_WITHIN, interval=0.02, what="greeter answering for fortune")
    for _ in range(5):
        assert answered_by_greeter(), answers
    print("answers after the kill:", *answers, sep="\n  ")
    # Every failure, including calls that raced the kill (502 from fortune's sidecar, whose
    # app refused), was a sidecar's fast, labelled answer: never a hang, never the app's.
    failures = [a for a in answers if a.status != 200]
    assert all(a.error and a.took < FAST for a in failures), answers
    assert failures[0].at < NOTICE_WITHIN, answers

    # Restart fortune (sidecar and app): calls by name succeed again.
    mesh.start("fortune")
    wait_until_reachable(greeter, "fortune", "/fortune")
    rid = request_id()
    status, _, body = get(f"{greeter.inbound}/ask-ruby", rid)
    assert status == 200, body
    assert body["fortune"]["requestId"] == rid


def test_sigterm_drains_the_node_sidecar_and_leaves_the_registry(mesh: Mesh) -> None:
    greeter, fortune = mesh.greeter, mesh.fortune
    wait_until_reachable(fortune, "greeter", "/health")
    node_pid = greeter.status()["app"]["pid"]
    assert len(mesh.registry.instance_ids("greeter")) == 1
    result: dict[str, Any] = {}

    def slow_call() -> None:
        started = time.monotonic()
        result["answer"] = get(f"{greeter.inbound}/slow?ms=1500", request_id(), timeout=15)
        result["took"] = time.monotonic() - started

    caller = threading.Thread(target=slow_call)
    caller.start()
    wait_for(lambda: greeter.status()["requests"]["inbound_active"] >= 1, 5, what="the slow call in flight")
    greeter.signal(signal.SIGTERM)
    caller.join(15)
    assert not caller.is_alive()

    status, _, body = result["answer"]
    assert status == 200, body
    assert body == {"service": "greeter", "sleptMs": 1500}
    assert greeter.wait(15) == 0
    # the app got its SIGTERM after the drain and ended (the sidecar reaped it)
    assert "greeter: SIGTERM received" in greeter.output()
    with pytest.raises(ProcessLookupError):
        os.kill(node_pid, 0)

    # gone from the registry: fortune's sidecar can no longer route to greeter
    def gone() -> bool:
        status, headers, _ = get(f"{fortune.outbound}/greeter/hello")
        return status in (404, 503) and sidecar_error(headers) is not None

    assert mesh.registry.instance_ids("greeter") == []
    wait_for(gone, NOTICE_WITHIN, interval=0.05, what="greeter gone for fortune's sidecar")


def test_server_sent_events_stream_through_both_sidecars(mesh: Mesh) -> None:
    # fortune's sidecar outbound -> greeter's sidecar inbound -> greeter's /events
    wait_until_reachable(mesh.fortune, "greeter", "/health")
    count, interval_ms = 5, 300
    conn = HTTPConnection("127.0.0.1", mesh.fortune.outbound_port, timeout=10)
    try:
        started = time.monotonic()
        conn.request(
            "GET",
            f"/greeter/events?count={count}&interval={interval_ms}",
            headers={"Accept": "text/event-stream", "X-Request-Id": request_id()},
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events: list[tuple[float, dict[str, Any]]] = []
        while True:
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                events.append((time.monotonic() - started, json.loads(line[6:])))
        ended = time.monotonic() - started
    finally:
        conn.close()

    assert [e["n"] for _, e in events] == list(range(1, count + 1))
    assert all(e["service"] == "greeter" for _, e in events)
    first, last = events[0][0], events[-1][0]
    # the events span (count - 1) intervals at the app; a proxy that buffered the body
    # would deliver them all together at the end
    spread = (count - 1) * interval_ms / 1000
    assert last - first > spread / 2, events
    assert ended - first > spread / 2, (ended, events)
