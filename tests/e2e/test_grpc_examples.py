"""End to end over gRPC: the Ruby client (examples/ruby/grpc_client.rb) calling the Node
greeter (examples/node/grpc-server.js) by name.

First the two examples alone (the client's --target at the server), then through two
sidecars, each test module-wide on one set of processes per registry (the local SQLite one
and the Consul test agent): the server under its sidecar with `--app-protocol h2c
--health-grpc`, the client as the supervised child of its own sidecar (it finds the
outbound listener in MICRO_SIDECAR_OUTBOUND and names the service by :authority), and once
through an `--upstream greeter=PORT` port with no authority of its own. The sidecars talk
mutual TLS to each other (`--mtls permissive`, the default).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.consul_agent import BackgroundAgent
from tests.helpers import (
    ADDRESS_IN_USE_RE,
    ROOT,
    Proc,
    ReportedPortProc,
    Sidecar,
    free_port,
    start_supervised,
    wait_for,
)

pytestmark = pytest.mark.e2e

GRPC_SERVER = ROOT / "examples" / "node" / "grpc-server.js"
GRPC_CLIENT = ROOT / "examples" / "ruby" / "grpc_client.rb"
STREAMED = 3  # replies of SayHellos
# the apps bind loopback only here (the server's default is 0.0.0.0)
LOOPBACK = {"HOST": "127.0.0.1"}


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("node", "ruby") if shutil.which(tool) is None]
    if not (ROOT / "examples" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing.append("examples/node/node_modules/@grpc/grpc-js (npm ci)")
    if "ruby" not in missing:
        probe = subprocess.run(["ruby", "-e", 'require "grpc"'], capture_output=True, timeout=30)
        if probe.returncode != 0:
            missing.append("ruby-grpc")
    return missing


_missing = _missing_tools()
if _missing and not os.environ.get("MICRO_SIDECAR_REQUIRE_E2E"):
    pytest.skip(
        f"gRPC end-to-end tests need {', '.join(_missing)}: run scripts/install-test-deps "
        "(set MICRO_SIDECAR_REQUIRE_E2E=1 to fail instead of skipping)",
        allow_module_level=True,
    )


def _require_tools() -> None:
    if _missing:  # and MICRO_SIDECAR_REQUIRE_E2E is set, or the module would have been skipped
        pytest.fail(f"MICRO_SIDECAR_REQUIRE_E2E is set but {', '.join(_missing)} missing", pytrace=False)


def request_id() -> str:
    return f"grpc-e2e-{uuid.uuid4()}"


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among a process's output lines (other lines are skipped)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


@dataclass
class ClientRun:
    code: int
    replies: list[dict[str, Any]]  # the client's JSON lines
    output: str


def run_client(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> ClientRun:
    """The Ruby client on its own (not under a sidecar), to its end."""
    done = subprocess.run(
        ["ruby", str(GRPC_CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return ClientRun(done.returncode, json_lines(done.stdout), done.stdout + done.stderr)


def assert_greeted(run: ClientRun, name: str, served_by: str) -> None:
    """One unary reply, then the STREAMED replies of the streaming call, in order."""
    assert run.code == 0, run.output
    calls = [r for r in run.replies if "call" in r]
    assert calls == [
        {"call": "SayHello", "message": f"Hello, {name}!", "served_by": served_by},
        *(
            {
                "call": "SayHellos",
                "n": n,
                "message": f"Hello, {name}! ({n} of {STREAMED})",
                "served_by": served_by,
            }
            for n in range(1, STREAMED + 1)
        ),
    ], run.output


# -- the examples alone --------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct_server() -> Iterator[ReportedPortProc]:
    _require_tools()
    server = ReportedPortProc(
        ["node", str(GRPC_SERVER)], env={**LOOPBACK, "PORT": "0", "INSTANCE": "node-direct"}
    )
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def test_ruby_client_calls_the_node_server_directly(direct_server: ReportedPortProc) -> None:
    run = run_client("--target", f"127.0.0.1:{direct_server.port}", "--name", "Ada")
    assert_greeted(run, "Ada", "node-direct")
    # without a sidecar the authority names nothing; the server answers whatever it is
    run = run_client("--target", f"127.0.0.1:{direct_server.port}", "--no-authority")
    assert_greeted(run, "ruby", "node-direct")


def test_ruby_client_exits_with_the_grpc_status_when_a_call_fails() -> None:
    _require_tools()
    run = run_client("--target", f"127.0.0.1:{free_port()}", "--timeout", "5")
    assert run.code == 14, run.output  # UNAVAILABLE: nothing listens there
    (error,) = run.replies
    assert (error["call"], error["error"], error["code"]) == ("SayHello", "UNAVAILABLE", 14), error
    # and without anywhere to call: a usage error (EX_USAGE), not a gRPC status
    env = {k: v for k, v in os.environ.items() if k != "MICRO_SIDECAR_OUTBOUND"}
    done = subprocess.run(["ruby", str(GRPC_CLIENT)], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 64 and "no target" in done.stderr, done


def test_node_server_finishes_a_stream_in_flight_on_sigterm() -> None:
    _require_tools()
    server = ReportedPortProc(
        ["node", str(GRPC_SERVER)], env={**LOOPBACK, "PORT": "0", "STREAM_INTERVAL_MS": "400"}
    )
    client: Proc | None = None
    try:
        port = server.wait_listening()
        client = caller = Proc(["ruby", str(GRPC_CLIENT), "--target", f"127.0.0.1:{port}"])
        wait_for(
            lambda: '"n":1' in caller.output() or caller.popen.poll() is not None,
            15,
            what="the first streamed reply",
        )
        server.signal(signal.SIGTERM)  # two replies still to come, 400 ms apart
        code = caller.wait(15)
        assert server.wait(15) == 0, server.output()
        run = ClientRun(code, json_lines(caller.output()), caller.output())
        assert_greeted(run, "ruby", f"{socket.gethostname()}:{port}")
        assert "SIGTERM received" in server.output()
    finally:
        if client is not None:
            client.stop()
        server.stop()


# -- through the sidecars ------------------------------------------------------------------

# probe every 0.2 s (the helper's default) with 0.5 s for an answer
HEALTH_ARGS = ("--health-timeout", "0.5", "--unhealthy-threshold", "2")


@dataclass
class Mesh:
    kind: str
    registry_args: tuple[str, ...]
    registry_path: Path
    greeter: Sidecar
    client: Sidecar  # greeter-client's sidecar with no app, and an --upstream greeter=PORT
    upstream_port: int
    started: list[Proc] = field(default_factory=list)

    def accesslog(self, rid: str) -> list[dict[str, Any]]:
        """The greeter sidecar's access-log lines for request id `rid`."""
        return [r for r in json_lines(self.greeter.output()) if r.get("request_id") == rid]

    def wait_accesslog(self, rid: str, calls: int = 2) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.accesslog(rid)) >= calls, 5, what=f"{calls} access-log lines for {rid}")
        return self.accesslog(rid)


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


def _start_client_sidecar(mesh_args: list[str], started: list[Proc]) -> tuple[Sidecar, int]:
    """greeter-client's sidecar, no app, with `--upstream greeter=PORT` on a port that was free
    a moment ago (--upstream takes no port 0): started again when another process took it."""
    for attempt in range(1, 4):
        port = free_port()
        sidecar = Sidecar(free_port(), *mesh_args, "--upstream", f"greeter={port}")
        started.append(sidecar)
        try:
            return sidecar.wait_started(), port
        except AssertionError:
            if attempt == 3 or not ADDRESS_IN_USE_RE.search(sidecar.output()):
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module", params=["local", "consul"])
def mesh(request, tmp_path_factory) -> Iterator[Mesh]:
    _require_tools()
    kind = request.param
    registry_path = tmp_path_factory.mktemp(f"grpc-{kind}") / "registry.sqlite3"
    started: list[Proc] = []
    app_pids: list[int] = []
    agent: BackgroundAgent | None = None
    try:
        registry_args: tuple[str, ...] = ("--registry-path", str(registry_path))
        if kind == "consul":
            agent = BackgroundAgent().start()
            registry_args += ("--registry", "consul", "--consul-addr", agent.addr)

        def launch_greeter(app_port: int) -> Sidecar:
            sidecar = Sidecar(
                app_port,
                "--name",
                "greeter",
                "--app-protocol",
                "h2c",
                "--health-grpc",
                *HEALTH_ARGS,
                *registry_args,
                env=LOOPBACK,
                command=["node", str(GRPC_SERVER)],
            )
            started.append(sidecar)
            return sidecar

        client_args = ["--name", "greeter-client", *HEALTH_ARGS, *registry_args]
        # the client's sidecar starts while greeter's comes up
        client, upstream_port = _start_client_sidecar(client_args, started)
        (greeter,) = start_supervised([launch_greeter], timeout=30)
        app_pids.append(greeter.status()["app"]["pid"])
        yield Mesh(kind, registry_args, registry_path, greeter, client, upstream_port, started)
    finally:
        for proc in reversed(started):
            proc.stop()
        for proc in started:  # pytest shows this only when a test failed
            lines = proc.output().splitlines()
            print(
                f"--- pid {proc.pid} {proc.popen.args[-3:]} (last 30 of {len(lines)} lines):",
                *lines[-30:],
                sep="\n",
            )
        for pid in app_pids:
            _kill_leftover_app(pid)
        if agent is not None:
            agent.stop()


def greeter_instance(mesh: Mesh) -> str:
    """served_by of the Node app under greeter's sidecar: this host and the --app-port."""
    return f"{socket.gethostname()}:{mesh.greeter.app_port}"


def assert_logged_by_greeter(mesh: Mesh, rid: str) -> None:
    """greeter's sidecar logged both calls inbound, as HTTP/2 gRPC calls that succeeded, from
    the caller its mutual TLS certificate named."""
    lines = mesh.wait_accesslog(rid)
    assert [(r["path"], r["direction"]) for r in lines] == [
        ("/greeter.Greeter/SayHello", "inbound"),
        ("/greeter.Greeter/SayHellos", "inbound"),
    ], lines
    for r in lines:
        assert (r["service"], r["method"], r["status"], r["protocol"], r["grpc_status"]) == (
            "greeter",
            "POST",
            200,
            "HTTP/2",
            "0",
        ), r
        assert r["caller"] == "greeter-client", r
        assert r["instance"] == f"127.0.0.1:{mesh.greeter.app_port}", r


def test_grpc_client_under_its_sidecar_calls_greeter_by_name(mesh: Mesh) -> None:
    # The client runs as the supervised app of its own sidecar: it reads the outbound
    # address from MICRO_SIDECAR_OUTBOUND, and the sidecar exits with the client's status.
    rid = request_id()
    one_shot = Sidecar(
        free_port(),
        "--name",
        "greeter-client",
        *HEALTH_ARGS,
        *mesh.registry_args,
        command=["ruby", str(GRPC_CLIENT), "--name", mesh.kind, "--request-id", rid],
    )
    mesh.started.append(one_shot)
    code = one_shot.wait(30)
    run = ClientRun(code, [r for r in json_lines(one_shot.output()) if "call" in r], one_shot.output())
    assert_greeted(run, mesh.kind, greeter_instance(mesh))
    assert_logged_by_greeter(mesh, rid)
    # the client's sidecar logged them outbound, to the greeter instance it picked
    out = [r for r in json_lines(one_shot.output()) if r.get("request_id") == rid]
    assert [(r["direction"], r["service"], r["grpc_status"]) for r in out] == [
        ("outbound", "greeter", "0")
    ] * 2


def test_grpc_client_through_an_upstream_port_without_an_authority(mesh: Mesh) -> None:
    # --upstream greeter=PORT: the port names the service, the client sends its target
    # (127.0.0.1:PORT) as the authority
    rid = request_id()
    run = run_client("--target", f"127.0.0.1:{mesh.upstream_port}", "--no-authority", "--request-id", rid)
    assert_greeted(run, "ruby", greeter_instance(mesh))
    assert_logged_by_greeter(mesh, rid)
    # and the client sidecar's ordinary outbound port with the authority, for comparison
    rid = request_id()
    run = run_client("--target", f"127.0.0.1:{mesh.client.outbound_port}", "--request-id", rid)
    assert_greeted(run, "ruby", greeter_instance(mesh))
    assert_logged_by_greeter(mesh, rid)


def test_grpc_call_to_an_unknown_service_gets_not_found_from_the_sidecar(mesh: Mesh) -> None:
    started = time.monotonic()
    run = run_client("--target", f"127.0.0.1:{mesh.client.outbound_port}", "--authority", "nosuch")
    assert run.code == 5, run.output  # NOT_FOUND, as a trailers-only answer of the client's sidecar
    (error,) = run.replies
    assert (error["call"], error["error"], error["code"]) == ("SayHello", "NOT_FOUND", 5), error
    assert "nosuch" in error["details"], error
    assert time.monotonic() - started < 10
