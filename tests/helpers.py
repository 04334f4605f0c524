"""Real processes on ephemeral loopback ports, and their clean-up."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port that was free a moment ago, for where nothing is meant to listen.

    Not for a port a process is started to bind: by the time it binds, another process may
    have taken it. Start such a process on port 0 and read the port it reports
    (ReportedPortProc), or, when the port must be chosen first (an app under a supervising
    sidecar listens on the sidecar's --app-port), let start_supervised() retry on a new one.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a process that could not bind its port says: Python's OSError, Ruby's
# Errno::EADDRINUSE ("Address already in use - bind(2)"), Node's "listen EADDRINUSE".
ADDRESS_IN_USE_RE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)


def listening_re(port: int) -> re.Pattern[str]:
    """The line a server prints once it has bound `port`: the test apps' "listening on
    HOST:PORT", Puma's "* Listening on http://HOST:PORT", the Node example's
    "greeter listening on http://HOST:PORT"."""
    return re.compile(rf"[Ll]istening on \S*:{port}\b")


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    status, _, body = http("GET", url, timeout=timeout)
    return status, json.loads(body)


class Proc:
    """A subprocess in its own process group, with its output in a file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="proc-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True
        )
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """Kill the process group (whatever is left of it) and reap."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


REPORTED_PORT_RE = re.compile(r"listening on \S+:(\d+)")


class ReportedPortProc(Proc):
    """A server started with `--port 0` (or the port given), that prints "listening on
    HOST:PORT" once bound: `port` is the one it reports, so that no port has to stay free
    between choosing it and the server's bind."""

    def __init__(
        self, args: list[str], port: int | None = None, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self._port = port or 0
        super().__init__(args, env=env, cwd=cwd)

    @property
    def port(self) -> int:
        """The port asked for, or else the bound one (waits for the server to report it)."""
        return self._port or self.wait_listening()

    def wait_listening(self, timeout: float = 15.0) -> int:
        """Wait for the "listening on HOST:PORT" line; the port in it."""

        def reported() -> int:
            match = REPORTED_PORT_RE.search(self.output())
            if match:
                return int(match.group(1))
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.popen.args} exited {self.popen.returncode}:\n{self.output()}")
            return 0

        port = wait_for(reported, timeout, what=f"pid {self.pid} to say where it listens")
        self._port = self._port or port
        return port


class App(ReportedPortProc):
    def __init__(self, name: str = "echo", port: int | None = None) -> None:
        super().__init__(
            [sys.executable, "-m", "tests.apps.echo_app", "--port", str(port or 0), "--name", name], port
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_up(self) -> App:
        wait_for(lambda: _can_connect(self.port), what=f"app on {self.port}")
        return self


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


START_RE = re.compile(r"inbound (\S+):(\d+) -> app .* outbound (\S+):(\d+), admin (\S+):(\d+)")


class Sidecar(Proc):
    def __init__(
        self,
        app_port: int,
        *args: str,
        registry_path: Path | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "--app-port",
            str(app_port),
            "--inbound-host",
            "127.0.0.1",
            "--inbound-port",
            "0",
            "--outbound-port",
            "0",
            "--admin-port",
            "0",
            "--health-interval",
            "0.2",
            "--drain-delay",
            "0.2",
        ]
        if registry_path is not None:
            argv += ["--registry-path", str(registry_path)]
        argv += list(args)
        if command:
            argv += ["--", *command]
        super().__init__(argv, env=env)
        self.app_port = app_port
        self.inbound_port = self.outbound_port = self.admin_port = 0

    def wait_started(self, timeout: float = 15.0) -> Sidecar:
        def started() -> bool:
            match = START_RE.search(self.output())
            if match:
                self.inbound_port = int(match.group(2))
                self.outbound_port = int(match.group(4))
                self.admin_port = int(match.group(6))
                return True
            if self.popen.poll() is not None:
                raise AssertionError(f"sidecar exited {self.popen.returncode}:\n{self.output()}")
            return False

        wait_for(started, timeout, what="sidecar start")
        return self

    def wait_ready(self, timeout: float = 15.0) -> Sidecar:
        self.wait_started(timeout)
        wait_for(lambda: self.ready()[0] == 200, timeout, what="sidecar /ready")
        return self

    @property
    def inbound(self) -> str:
        return f"http://127.0.0.1:{self.inbound_port}"

    @property
    def outbound(self) -> str:
        return f"http://127.0.0.1:{self.outbound_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def ready(self) -> tuple[int, Any]:
        return get_json(f"{self.admin}/ready")

    def status(self) -> dict[str, Any]:
        return get_json(f"{self.admin}/status")[1]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


class AppPortTaken(Exception):
    """A supervised app could not bind the app port: another process took it first."""


def wait_supervised(sidecar: Sidecar, timeout: float = 30.0) -> Sidecar:
    """Wait until a sidecar that supervises its app (`command=`) is ready and the app has said
    it listens on the app port (not just anything answering there: the sidecar's probes
    would pass on another process's port too). AppPortTaken when the app could not bind it."""
    listening = listening_re(sidecar.app_port)

    def up() -> bool:
        out = sidecar.output()
        if sidecar.popen.poll() is not None:
            if ADDRESS_IN_USE_RE.search(out) and not listening.search(out):
                raise AppPortTaken(f"app port {sidecar.app_port} taken (sidecar pid {sidecar.pid})")
            raise AssertionError(f"sidecar exited {sidecar.popen.returncode}:\n{out}")
        if not listening.search(out) or not START_RE.search(out):
            return False
        sidecar.wait_started(timeout)  # reads the ports from its start line
        try:
            return sidecar.ready()[0] == 200
        except OSError:  # it is stopping: the next round sees it exit
            return False

    wait_for(up, timeout, what=f"sidecar pid {sidecar.pid} ready with its app on {sidecar.app_port}")
    return sidecar


def start_supervised(
    launchers: list[Callable[[int], Sidecar]],
    attempts: int = 5,
    timeout: float = 30.0,
    pick: Callable[[], int] = free_port,
) -> list[Sidecar]:
    """Start sidecars that supervise their apps, each with an app port from `pick()`, all at
    once, then wait for each; one whose app found its port taken is started again on a new
    port (at most `attempts` times in all). A launcher starts a sidecar on the port it is
    given and hands it to whoever stops it (a test's `procs`): failed attempts included, so
    that everything is stopped, pass or fail."""
    sidecars = [launch(pick()) for launch in launchers]
    for i, launch in enumerate(launchers):
        for attempt in range(1, attempts + 1):
            try:
                wait_supervised(sidecars[i], timeout)
                break
            except AppPortTaken:
                if attempt == attempts:
                    raise
                sidecars[i] = launch(pick())
    return sidecars
