"""Shipping artefacts: the Dockerfiles, docker-compose.yml, the Kubernetes manifests and the
example apps. Linters and validators run for real; structural checks read the files the way
Docker, Compose and kubelet would, and the example apps are started and spoken to over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
RUBY_DIR = ROOT / "examples" / "ruby"
K8S_DIR = ROOT / "examples" / "kubernetes"
DOCKERFILES = [ROOT / "Dockerfile", NODE_DIR / "Dockerfile", RUBY_DIR / "Dockerfile"]
MANIFESTS = [K8S_DIR / "deployment.yaml", K8S_DIR / "job.yaml"]
# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
K8S_VERSIONS = ["1.29.0", "1.30.0"]
ADMIN_PORT = 15020


def run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH; install the test dependencies (pip install -e .[test])")
    return path


# --------------------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order, with backslash continuations joined and comments dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = lineno
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        text = " ".join(part for part in buf if part)
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = []
    assert not buf, f"{path}: the last instruction ends with a dangling backslash"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        assert result, f"line {ins.line}: {ins.keyword} before the first FROM"
        result[-1].append(ins)
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint")
    result = run([hadolint, "--no-color", str(dockerfile.relative_to(ROOT))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile() -> None:
    """Guards the test above: the linter really lints (an unpinned apt install as root)."""
    hadolint = require_tool("hadolint")
    bad = "FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y curl\n"
    result = run([hadolint, "--no-color", "-"], input=bad)
    assert result.returncode != 0
    assert "DL3008" in result.stdout


def test_sidecar_dockerfile_builds_a_wheel_into_a_venv_on_slim_python() -> None:
    built, final = stages(parse_dockerfile(ROOT / "Dockerfile"))[-2:]
    assert re.fullmatch(r"python:3\.11-slim\S* +AS +build", built[0].args, re.IGNORECASE), built[0].args
    assert re.fullmatch(r"python:3\.11-slim\S*", final[0].args), final[0].args
    build_runs = " ".join(i.args for i in built if i.keyword == "RUN")
    assert "pip wheel" in build_runs
    assert "-m venv /opt/micro-sidecar" in build_runs
    assert "--no-index" in build_runs, "the venv must be filled from the built wheels only"
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert any(c.startswith("--from=build ") and "/opt/micro-sidecar" in c for c in copies), copies
    assert not any(i.keyword == "RUN" and "pip " in i.args for i in final), "no pip in the final stage"


def test_sidecar_dockerfile_runtime_contract() -> None:
    final = stages(parse_dockerfile(ROOT / "Dockerfile"))[-1]
    by_kw: dict[str, list[str]] = {}
    for ins in final:
        by_kw.setdefault(ins.keyword, []).append(ins.args)

    users = by_kw.get("USER", [])
    assert users, "the final stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"

    assert [json.loads(e) for e in by_kw.get("ENTRYPOINT", [])] == [["micro-sidecar"]]
    assert "CMD" not in by_kw, "a CMD would be appended to env-only configurations"
    assert by_kw.get("STOPSIGNAL") == ["SIGTERM"]
    assert "15006" in " ".join(by_kw.get("EXPOSE", [])).split()

    env = " ".join(by_kw.get("ENV", []))
    assert "MICRO_SIDECAR_INBOUND_HOST=0.0.0.0" in env
    assert re.search(r'PATH="?/opt/micro-sidecar/bin:', env), env

    (healthcheck,) = by_kw.get("HEALTHCHECK", [None])
    assert healthcheck is not None, "HEALTHCHECK missing"
    assert "/live" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck


def healthcheck_command() -> list[str]:
    (healthcheck,) = [i.args for i in parse_dockerfile(ROOT / "Dockerfile") if i.keyword == "HEALTHCHECK"]
    _, _, exec_form = healthcheck.partition("CMD ")
    return json.loads(exec_form)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_dockerfile_healthcheck_command_reads_admin_live(status: int, healthy: bool) -> None:
    """Runs the HEALTHCHECK's own command against a stand-in admin listener."""
    seen: list[str] = []

    class Admin(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmd = healthcheck_command()
        assert cmd[0] == "/opt/micro-sidecar/bin/python"
        env = {**os.environ, "MICRO_SIDECAR_ADMIN_PORT": str(server.server_address[1])}
        result = run([sys.executable, *cmd[1:]], env=env, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["/live"]
    assert (result.returncode == 0) is healthy, result.stderr


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MICRO_SIDECAR_ADMIN_PORT": str(port)}
    result = run([sys.executable, *healthcheck_command()[1:]], env=env, timeout=30)
    assert result.returncode != 0


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allowlist: ignore everything, then re-include"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"pyproject.toml", "setup.cfg", "sidecar", "README.md"} <= allowed
    assert not any(a.startswith(("examples", "node_modules", ".git")) for a in allowed)
    # Everything the Dockerfile copies from the context must be allowed in.
    for ins in parse_dockerfile(ROOT / "Dockerfile"):
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            for src in ins.args.split()[:-1]:
                top = re.sub(r"\[.*", "", src).rstrip("/").split("/")[0]
                assert any(a.startswith(top) for a in allowed), f"COPY {src} is excluded by .dockerignore"


def test_example_images_run_their_app_as_non_root() -> None:
    for dockerfile, cmd in (
        (NODE_DIR / "Dockerfile", ["node", "server.js"]),
        (RUBY_DIR / "Dockerfile", ["./run.sh"]),
    ):
        final = stages(parse_dockerfile(dockerfile))[-1]
        users = [i.args for i in final if i.keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), dockerfile
        cmds = [json.loads(i.args) for i in final if i.keyword == "CMD"]
        assert cmds == [cmd], dockerfile
        env = " ".join(i.args for i in final if i.keyword == "ENV")
        assert "HOST=0.0.0.0" in env, f"{dockerfile}: the app must listen beyond loopback by default"


# --------------------------------------------------------------------------- docker-compose.yml


def compose() -> dict:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_runs_consul_in_dev_mode() -> None:
    consul = compose()["services"]["consul"]
    assert consul["image"].startswith("hashicorp/consul:")
    command = consul["command"]
    command = command.split() if isinstance(command, str) else command
    assert command[:2] == ["agent", "-dev"]
    assert command[command.index("-client") + 1] == "0.0.0.0"
    assert "healthcheck" in consul, "sidecars wait for a healthy Consul"


def test_compose_pairs_each_app_with_a_sidecar_on_consul() -> None:
    services = compose()["services"]
    sidecars = {name: svc for name, svc in services.items() if "MICRO_SIDECAR_APP_PORT" in env_of(svc)}
    apps = {svc["network_mode"].removeprefix("service:"): name for name, svc in sidecars.items()}
    assert set(apps) == {"greeter", "fortune"}, apps

    for app_name, sidecar_name in apps.items():
        sidecar, app = services[sidecar_name], services[app_name]
        s_env, a_env = env_of(sidecar), env_of(app)
        assert sidecar["network_mode"] == f"service:{app_name}"
        assert s_env["MICRO_SIDECAR_REGISTRY"] == "consul"
        assert s_env["CONSUL_HTTP_ADDR"] == "consul:8500"
        assert s_env["MICRO_SIDECAR_NAME"] == app_name
        assert s_env["MICRO_SIDECAR_APP_PORT"] == a_env["PORT"], (
            f"{sidecar_name} must target {app_name}'s port"
        )
        depends = sidecar["depends_on"]
        assert "consul" in depends and app_name in depends
        assert depends["consul"]["condition"] == "service_healthy"
        assert sidecar["build"]["context"] == "."
        assert (ROOT / sidecar["build"]["context"] / "Dockerfile").is_file()
        assert "ports" not in sidecar, "a service in another's network namespace cannot publish ports"

        # The app: reachable only through its sidecar, calling out through it.
        assert a_env["HOST"] == "127.0.0.1"
        assert a_env["MICRO_SIDECAR_OUTBOUND"] == "http://127.0.0.1:15001"
        assert any(str(p).endswith(":15006") for p in app["ports"]), app["ports"]
        assert (ROOT / app["build"]["context"] / "Dockerfile").is_file()


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_validates(manifest: Path, version: str) -> None:
    tool = require_tool("kubernetes-validate")
    result = run([tool, "--strict", "-k", version, str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout and "failed" not in result.stdout + result.stderr


def test_kubernetes_validate_rejects_a_misspelt_field(tmp_path: Path) -> None:
    """Guards the test above: strict validation does catch an unknown field."""
    tool = require_tool("kubernetes-validate")
    doc = yaml.safe_load((K8S_DIR / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    result = run([tool, "--strict", "-k", "1.30.0", str(broken)])
    assert result.returncode != 0


def container_env(container: dict) -> dict[str, dict]:
    """name -> the env entry, after checking that $(VAR) references point to earlier entries,
    the only ones Kubernetes expands."""
    seen: dict[str, dict] = {}
    for entry in container.get("env", []):
        for ref in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
            assert ref in seen, f"{container['name']}: {entry['name']} uses $({ref}) before it is defined"
        seen[entry["name"]] = entry
    for arg in container.get("args", []):
        for ref in re.findall(r"\$\((\w+)\)", arg):
            assert ref in seen, f"{container['name']}: args use $({ref}), which is not defined"
    return seen


def field_ref(entry: dict) -> str | None:
    return entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")


def probe_port(container: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def load(manifest: Path) -> dict:
    (doc,) = list(yaml.safe_load_all(manifest.read_text()))
    return doc


def test_deployment_runs_the_sidecar_as_a_native_sidecar_on_consul() -> None:
    pod = load(K8S_DIR / "deployment.yaml")["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c.get("restartPolicy") == "Always"]
    (app,) = pod["containers"]
    env = container_env(sidecar)

    assert field_ref(env["HOST_IP"]) == "status.hostIP"
    assert env["CONSUL_HTTP_ADDR"]["value"] == "$(HOST_IP):8500"
    assert env["MICRO_SIDECAR_REGISTRY"]["value"] == "consul"
    assert field_ref(env["MICRO_SIDECAR_ADVERTISE_ADDRESS"]) == "status.podIP"
    assert env["MICRO_SIDECAR_INBOUND_HOST"]["value"] == "0.0.0.0"
    # kubelet probes the pod IP, so admin cannot stay on loopback.
    assert env["MICRO_SIDECAR_ADMIN_HOST"]["value"] == "0.0.0.0"

    app_env = container_env(app)
    assert env["MICRO_SIDECAR_APP_PORT"]["value"] == app_env["PORT"]["value"]
    assert app_env["HOST"]["value"] == "127.0.0.1"
    assert app_env["MICRO_SIDECAR_OUTBOUND"]["value"] == "http://127.0.0.1:15001"

    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(sidecar, sidecar[probe]) == ADMIN_PORT, probe

    security = sidecar["securityContext"]
    assert security["runAsUser"] != 0 and pod["securityContext"]["runAsNonRoot"] is True


def test_deployment_shutdown_budget_covers_the_drain() -> None:
    pod = load(K8S_DIR / "deployment.yaml")["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    (app,) = pod["containers"]
    env = container_env(sidecar)
    drain = float(env["MICRO_SIDECAR_DRAIN_DELAY"]["value"])
    grace = float(env["MICRO_SIDECAR_GRACE_PERIOD"]["value"])
    app_stop = float(container_env(app)["SHUTDOWN_TIMEOUT_MS"]["value"]) / 1000

    hook = app["lifecycle"]["preStop"]["exec"]["command"]
    script = " ".join(hook)
    assert f"127.0.0.1:{ADMIN_PORT}" in script and "/shutdown" in script and "POST" in script
    (wait_ms,) = [int(n) for n in re.findall(r"Date\.now\(\) \+ (\d+)", script)]
    assert wait_ms / 1000 >= drain + grace, "the preStop must wait out the sidecar's drain"
    assert pod["terminationGracePeriodSeconds"] >= wait_ms / 1000 + app_stop


def test_prestop_hook_drains_then_waits_for_the_sidecar_to_go() -> None:
    """Runs the Deployment's preStop script with Node against a stand-in admin listener that
    exits 1 s after POST /shutdown: the hook must post once and return once it is gone."""
    node = require_tool("node")
    (app,) = load(K8S_DIR / "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    command = app["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["node", "-e"]
    calls: list[str] = []

    class Admin(BaseHTTPRequestHandler):
        def reply(self) -> None:
            calls.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = reply

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = command[2].replace(f":{ADMIN_PORT}", f":{port}")
    proc = subprocess.Popen([node, "-e", script])
    try:
        deadline = time.monotonic() + 10
        while "POST /shutdown" not in calls and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)
        assert proc.poll() is None, "the hook returned while the sidecar was still up"
        server.shutdown()
        server.server_close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert calls[0] == "POST /shutdown" and calls.count("POST /shutdown") == 1
    assert set(calls[1:]) == {"GET /live"}


def test_job_ends_its_sidecar_with_shutdown() -> None:
    job = load(K8S_DIR / "job.yaml")
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert "initContainers" not in pod
    by_name = {c["name"]: c for c in pod["containers"]}
    sidecar = by_name.pop("micro-sidecar")
    (main,) = by_name.values()
    # A restartPolicy: Always sidecar would be restarted after /shutdown.
    assert "restartPolicy" not in sidecar

    env = container_env(sidecar)
    assert field_ref(env["HOST_IP"]) == "status.hostIP"
    assert env["CONSUL_HTTP_ADDR"]["value"] == "$(HOST_IP):8500"
    assert field_ref(env["MICRO_SIDECAR_ADVERTISE_ADDRESS"]) == "status.podIP"

    script = "\n".join(main["args"])
    assert re.search(r"-X POST\b.*\$admin/shutdown", script), script
    assert f"admin=http://127.0.0.1:{ADMIN_PORT}" in script
    assert "$MICRO_SIDECAR_OUTBOUND/greeter/" in script
    assert container_env(main)["MICRO_SIDECAR_OUTBOUND"]["value"] == "http://127.0.0.1:15001"
    # the work's exit status is the Job's, not the shutdown call's
    assert script.rstrip().endswith('exit "$status"')


# --------------------------------------------------------------------------- example sources


def test_node_app_passes_node_check() -> None:
    node = require_tool("node")
    result = run([node, "--check", "server.js"], cwd=NODE_DIR)
    assert result.returncode == 0, result.stderr


def test_node_lockfile_matches_package_json() -> None:
    package = json.loads((NODE_DIR / "package.json").read_text())
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    assert package["dependencies"]["express"].lstrip("^~").startswith("5.")
    assert lock["packages"][""]["dependencies"] == package["dependencies"]
    assert lock["packages"]["node_modules/express"]["version"].startswith("5.")


RUBY_SOURCES = ["app.rb", "config.ru", "puma.rb", "Gemfile"]


@pytest.mark.parametrize("source", RUBY_SOURCES)
def test_ruby_sources_pass_ruby_c(source: str) -> None:
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby is not installed (scripts/install-test-deps installs it)")
    # one file per call: `ruby -c a b` checks only a
    result = run([ruby, "-c", source], cwd=RUBY_DIR)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Syntax OK"


@pytest.mark.parametrize(
    ("shell", "script"),
    [("sh", RUBY_DIR / "run.sh"), ("bash", ROOT / "scripts" / "install-test-deps")],
    ids=["run.sh", "install-test-deps"],
)
def test_shell_scripts_parse_and_are_executable(shell: str, script: Path) -> None:
    result = run([shell, "-n", str(script)])
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_install_test_deps_is_a_no_op_when_everything_is_present() -> None:
    """On a machine where the deps are in place (as on CI after scripts/test ran it), a second
    run must install nothing: no apt-get, no npm ci."""
    missing = [p for p in ("ruby", "puma", "nginx", "wrk") if shutil.which(p) is None]
    if missing or not (NODE_DIR / "node_modules" / ".package-lock.json").is_file():
        pytest.skip(f"test deps not installed yet (missing: {missing or ['node_modules']})")
    lock = NODE_DIR / "package-lock.json"
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    if lock.stat().st_mtime > stamp.stat().st_mtime:
        pytest.skip("node_modules is older than the lockfile; scripts/install-test-deps would refresh it")
    result = run(["bash", str(ROOT / "scripts" / "install-test-deps")], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


# --------------------------------------------------------------------------- the apps, for real


@dataclass
class RunningApp:
    proc: subprocess.Popen[str]
    base: str
    lines: list[str]


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, Message, bytes]:
    """(status, headers with case-insensitive lookup, body)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def start_app(cmd: list[str], cwd: Path, env: dict[str, str], listening: re.Pattern[str]) -> RunningApp:
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, "PORT": "0", "HOST": "127.0.0.1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    found: list[str] = []
    got_port = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = listening.search(line)
            if m and not found:
                found.append(m.group(1))
                got_port.set()

    threading.Thread(target=pump, daemon=True).start()
    if not got_port.wait(30):
        proc.kill()
        proc.wait()
        pytest.fail(f"{cmd} did not report a listening port:\n{''.join(lines)}")
    return RunningApp(proc, f"http://127.0.0.1:{found[0]}", lines)


def stop_app(app: RunningApp) -> None:
    if app.proc.poll() is None:
        app.proc.kill()
        app.proc.wait()


@pytest.fixture
def greeter() -> Iterator[RunningApp]:
    node = require_tool("node")
    if not (NODE_DIR / "node_modules" / "express").is_dir():
        pytest.fail("examples/node/node_modules is missing: run scripts/install-test-deps")
    app = start_app(
        [node, "server.js"], NODE_DIR, {}, re.compile(r"greeter listening on http://127\.0\.0\.1:(\d+)")
    )
    yield app
    stop_app(app)


@pytest.fixture
def fortune() -> Iterator[RunningApp]:
    if shutil.which("ruby") is None or shutil.which("puma") is None:
        pytest.skip("ruby/puma are not installed (scripts/install-test-deps installs them)")
    app = start_app(["./run.sh"], RUBY_DIR, {}, re.compile(r"Listening on http://127\.0\.0\.1:(\d+)"))
    yield app
    stop_app(app)


def test_greeter_serves_health_hello_and_sse(greeter: RunningApp) -> None:
    status, _, body = http_get(f"{greeter.base}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"

    status, _, body = http_get(f"{greeter.base}/hello?name=Ada", {"X-Request-Id": "rid-42"})
    assert status == 200
    assert json.loads(body) == {"service": "greeter", "message": "Hello, Ada!", "requestId": "rid-42"}

    status, headers, body = http_get(f"{greeter.base}/events?count=3&interval=20")
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e.strip()]
    assert len(events) == 3
    data = [
        json.loads(line.removeprefix("data: "))
        for e in events
        for line in e.splitlines()
        if line.startswith("data: ")
    ]
    assert [d["n"] for d in data] == [1, 2, 3]

    status, _, body = http_get(f"{greeter.base}/ask-ruby")
    assert status == 503 and json.loads(body)["error"] == "no_outbound"


def test_fortune_serves_health_and_fortune(fortune: RunningApp) -> None:
    status, _, body = http_get(f"{fortune.base}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = http_get(f"{fortune.base}/fortune", {"X-Request-Id": "rid-7", "Host": "fortune"})
    answer = json.loads(body)
    assert status == 200 and answer["requestId"] == "rid-7" and answer["fortune"]
    status, _, body = http_get(f"{fortune.base}/ask-node")
    assert status == 503 and json.loads(body)["error"] == "no_outbound"


@pytest.mark.parametrize("app_name", ["greeter", "fortune"])
def test_app_finishes_in_flight_request_on_sigterm_and_exits_0(app_name: str, request) -> None:
    app: RunningApp = request.getfixturevalue(app_name)
    result: dict = {}

    def slow() -> None:
        result["answer"] = http_get(f"{app.base}/slow?ms=1500")

    client = threading.Thread(target=slow)
    client.start()
    time.sleep(0.5)
    app.proc.send_signal(signal.SIGTERM)
    client.join(15)
    assert app.proc.wait(timeout=15) == 0, "".join(app.lines)
    status, _, body = result["answer"]
    assert status == 200 and json.loads(body)["sleptMs"] == 1500
