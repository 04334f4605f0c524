"""Processes and measurements for bench/run.py: start things, read /proc, drive wrk.

Every process started here runs in its own session (process group) and is listed in
`Harness.procs`, so that `Harness.close()` (called from a `finally`) can stop every one
of them, and only them, on success, error or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH / "wrk.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
BIG = 10 * MiB  # the download and upload size
SMALL_BODY = b"hello, world\n"

T = TypeVar("T")


# --- tools -------------------------------------------------------------------------------


def ensure_debian_packages(packages: list[str]) -> None:
    """apt-get install the packages that `dpkg -s` does not find (needs root)."""
    missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    print(f"installing {' '.join(missing)} from Debian ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Keep the nginx package from starting a system-wide nginx on port 80 while installing.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env
        )
    finally:
        if made_policy:
            policy.unlink()


def ensure_py_spy() -> str:
    found = shutil.which("py-spy")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    found = shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy installed but not on PATH")
    return found


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A loopback port that was free a moment ago. Whatever is started to bind it may find it
    taken by then: start it through on_free_ports(), which tries again on new ports."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A process that could not bind its port: nginx's "bind() ... failed (98: Address already in
# use)", the sidecar's "listener cannot bind HOST:PORT: Address already in use".
ADDRESS_IN_USE_RE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)


class PortTaken(RuntimeError):
    """A process exited because a port it was told to bind was taken in the meantime."""


def on_free_ports(start: Callable[[], T], attempts: int = 5) -> T:
    """`start()`: pick ports with free_port(), start what binds them, wait until it serves
    (wait_http). Called again, at most `attempts` times in all, while what it started exits
    because another process took one of those ports first. A failed attempt's process stays
    in Harness.procs (exited), so close() still reaps it."""
    for attempt in range(1, attempts + 1):
        try:
            return start()
        except PortTaken as exc:
            if attempt == attempts:
                raise
            print(f"{str(exc).splitlines()[0]}; again on new ports", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


# --- /proc ---------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_tree(roots: list[int]) -> list[int]:
    """The roots and all their living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(roots: list[int]) -> float:
    """user+system CPU seconds of the process trees under `roots`."""
    total = 0
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def rss_kib(roots: list[int]) -> int:
    total = 0
    for pid in process_tree(roots):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on this machine (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM
    second_signal: bool = False  # the sidecar exits at once on a second signal

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, self.stop_signal)
                if self.second_signal:
                    time.sleep(0.3)
                    os.killpg(self.pid, self.stop_signal)
                self.popen.wait(5)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                pass
        try:  # whatever is left of the group
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Harness:
    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        core: int | str | None = None,
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
        second_signal: bool = False,
    ) -> Proc:
        """Start `argv` in its own session; `core`: a core or a taskset list ("0,1")."""
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=dict(os.environ, **(env or {})),
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path, stop_signal, second_signal)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


# --- HTTP checks ---------------------------------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_http(url: str, proc: Proc, timeout: float = 30.0, want: bytes | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = proc.log_tail()
            if ADDRESS_IN_USE_RE.search(tail):
                raise PortTaken(f"{proc.name} exited {proc.popen.returncode}: a port it was given was taken")
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{tail}")
        try:
            status, body = http_get(url)
            if status == 200 and (want is None or body == want):
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: {url} not ready after {timeout}s ({last}):\n{proc.log_tail()}")


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    """Until `proc` accepts TCP connections on `port` (for a port that speaks only TLS)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            tail = proc.log_tail()
            if ADDRESS_IN_USE_RE.search(tail):
                raise PortTaken(f"{proc.name} exited {proc.popen.returncode}: a port it was given was taken")
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: nothing listens on port {port} after {timeout}s:\n{proc.log_tail()}")


# --- wrk -----------------------------------------------------------------------------------


def run_wrk(
    harness: Harness,
    url: str,
    conns: int,
    duration: int,
    core: int,
    *,
    upload_bytes: int = 0,
    timeout_s: int = 2,
) -> dict[str, Any]:
    """One bounded wrk run, one thread on `core`; its JSON summary plus its own CPU seconds."""
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{duration}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    env = {"BENCH_BODY_BYTES": str(upload_bytes)}
    before = children_cpu_seconds()
    proc = harness.start(f"wrk-{conns}", argv, core=core, env=env, stop_signal=signal.SIGKILL)
    try:
        proc.popen.wait(duration + 60)
    finally:
        proc.stop()
        harness.procs.remove(proc)
    text = proc.log_path.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCHJSON "):
            result: dict[str, Any] = json.loads(line[len("BENCHJSON ") :])
            result["wrk_cpu_s"] = children_cpu_seconds() - before
            return result
    raise RuntimeError(f"wrk gave no result for {url} ({conns} conns):\n{text[-2000:]}")


# --- idle keep-alive connections -------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        await reader.readuntil(b"0\r\n\r\n")
    elif length:
        await reader.readexactly(length)


async def _hold_and_measure(
    port: int, path: str, n: int, roots: list[int], settle: float
) -> tuple[int, int, int]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(100)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            writers.append(writer)
            writer.write(request)
            await writer.drain()
            await asyncio.wait_for(_read_response(reader), 20)

    try:
        results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
        failed = sum(isinstance(r, BaseException) for r in results)
        await asyncio.sleep(settle)
        return rss_kib(roots), n - failed, failed
    finally:
        for writer in writers:
            writer.close()


def rss_with_keepalive(port: int, path: str, n: int, roots: list[int], settle: float = 1.0) -> dict[str, int]:
    """Open `n` keep-alive connections, one request each, hold them idle and read VmRSS."""
    rss, opened, failed = asyncio.run(_hold_and_measure(port, path, n, roots, settle))
    return {"rss_kib": rss, "opened": opened, "failed": failed}
