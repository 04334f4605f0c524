"""Start-up and stop: registry failures, signals, supervisor mode, /shutdown, crashes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import pytest

from sidecar.config import build_config
from sidecar.runtime import Sidecar as SidecarRuntime
from tests.helpers import free_port, http, wait_for


def test_registry_failing_at_startup_does_not_stop_serving(start_app, start_sidecar, tmp_path):
    app = start_app()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the registry's directory should be")
    sc = start_sidecar(app.port, registry_path=blocker / "registry.sqlite3", ready=False)
    wait_for(lambda: sc.status()["app"]["healthy"], 10, what="app healthy")
    code, body = sc.ready()
    assert code == 503 and "not registered" in body["reason"]
    assert http("GET", f"{sc.inbound}/still-serving")[0] == 200
    assert sc.popen.poll() is None
    assert "Traceback" not in sc.output()
    # fix the registry while it runs: the sidecar registers on its own retry
    blocker.unlink()
    wait_for(lambda: sc.ready()[0] == 200, 40, what="registered after the registry came back")


def test_second_signal_exits_at_once(start_app, start_sidecar):
    app = start_app()
    sc = start_sidecar(app.port, "--drain-delay", "30")
    sc.signal(signal.SIGTERM)
    wait_for(lambda: "draining" in sc.output(), 5, what="first signal noticed")
    time.sleep(0.6)  # a repeat within 0.5 s counts as the same request (group kills)
    started = time.monotonic()
    sc.signal(signal.SIGTERM)
    code = sc.wait(5)
    assert time.monotonic() - started < 3
    assert code == 128 + signal.SIGTERM


def test_supervisor_mode_starts_the_app_with_its_environment(start_supervised_sidecar):
    sc = start_supervised_sidecar(
        [sys.executable, "-m", "tests.apps.echo_app", "--name", "sup"], "--name", "sup"
    )
    status = sc.status()
    assert status["app"]["pid"]
    # the app got PORT (it listens where the sidecar probes) and MICRO_SIDECAR_OUTBOUND
    code, _, body = http("GET", f"{sc.outbound}/sup/through-the-mesh")
    assert code == 200 and json.loads(body)["app"] == "sup"
    sc.signal(signal.SIGTERM)
    assert sc.wait(15) == 0
    out = sc.output()
    assert out.index("SIGTERM received") < out.index("deregistered")


ENV_DUMP = (
    "import os, sys, json; print('ENV', json.dumps({k: os.environ.get(k) for k in "
    "('MICRO_SIDECAR_OUTBOUND', 'PORT')}), flush=True); sys.exit(3)"
)


def test_the_same_signal_twice_at_once_is_one_stop_request(start_app, start_sidecar):
    app = start_app()
    sc = start_sidecar(app.port, "--drain-delay", "0.5")
    sc.signal(signal.SIGTERM)
    sc.signal(signal.SIGTERM)  # as `timeout` or a process-group kill delivers it
    assert sc.wait(15) == 0
    assert "exiting at once" not in sc.output()
    assert "deregistered" in sc.output()


def test_app_exit_code_becomes_the_sidecars(start_sidecar):
    port = free_port()  # the app only prints PORT: nothing binds it
    sc = start_sidecar(port, ready=False, command=[sys.executable, "-c", ENV_DUMP])
    assert sc.wait(15) == 3
    line = next(line for line in sc.output().splitlines() if line.startswith("ENV "))
    env = json.loads(line[4:])
    assert env["PORT"] == str(port)
    assert env["MICRO_SIDECAR_OUTBOUND"] == f"http://127.0.0.1:{sc.outbound_port}"
    assert "app exited with code 3" in sc.output()


def test_app_command_not_found_exits_127(start_sidecar):
    sc = start_sidecar(free_port(), ready=False, command=["/nonexistent/app-binary"])  # no app binds it
    assert sc.wait(15) == 127
    assert "cannot start app '/nonexistent/app-binary'" in sc.output()
    assert "Traceback" not in sc.output()


def test_admin_shutdown_stops_gracefully(start_app, start_sidecar):
    app = start_app()
    sc = start_sidecar(app.port)
    assert http("GET", f"{sc.admin}/shutdown")[0] == 405
    code, _, body = http("POST", f"{sc.admin}/shutdown")
    assert code == 202 and json.loads(body)["shutting_down"] is True
    assert sc.wait(15) == 0
    assert "stopping (POST /shutdown)" in sc.output()


async def test_a_crashing_part_stops_the_process_and_names_the_part(tmp_path, caplog):
    config = build_config(
        app_port=free_port(),  # no app: it stops before a probe matters
        inbound_host="127.0.0.1",
        inbound_port=0,
        outbound_port=0,
        admin_port=0,
        registry_path=str(tmp_path / "r.sqlite3"),
        drain_delay=0,
        health_interval=0.1,
    )
    runtime = SidecarRuntime(config)

    async def broken() -> None:
        await asyncio.sleep(0.1)
        raise RuntimeError("probe loop exploded")

    runtime.health.run = broken  # type: ignore[method-assign]
    code = await asyncio.wait_for(runtime.run(), 15)
    assert code == 1
    assert "part 'health checker' crashed" in caplog.text
    assert "probe loop exploded" in caplog.text


@pytest.mark.parametrize("path", ["/live", "/ready", "/status", "/metrics"])
def test_admin_endpoints_answer(start_app, start_sidecar, path):
    app = start_app()
    sc = start_sidecar(app.port)
    code, _, body = http("GET", f"{sc.admin}{path}")
    assert code == 200
    if path == "/status":
        status = json.loads(body)
        assert status["ports"]["inbound"] == sc.inbound_port
        assert status["ports"]["outbound"] == sc.outbound_port
        assert status["registry"]["kind"] == "local"
        assert status["app"]["healthy"] is True
    if path == "/metrics":
        assert b"sidecar_app_healthy 1" in body
