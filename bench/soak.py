"""A bounded, seeded chaos soak: real sidecars and apps on loopback, steady load, random faults.

    python bench/soak.py [--seed 1] [--duration 120] [--json FILE] [--workdir DIR]

Three instances of service `orders` (each a recording app, tests/apps/recording_app.py, and
a sidecar on fixed ports) and one caller sidecar (`--per-try-timeout 2`) share a local
registry file. 32 clients call `http://127.0.0.1:<caller outbound>/orders/...` for the
duration: 30 % GETs, 30 % POSTs without an Idempotency-Key, 25 % PUTs and 15 % POSTs with
an Idempotency-Key (unique per request). Bodies (0-200 KiB, all within the sidecar's
256 KiB replay buffer) go with a Content-Length or chunked; 40 % of the PUTs and keyed
POSTs send theirs slowly, in 3-5 parts with 0.05-0.2 s pauses, so that a fault can end an
attempt while the body is still arriving and the retry must replay it whole. Every
request has its own X-Request-Id; the apps write down each one they receive.

Every 2-5 s (seeded) one instance gets a fault, never leaving fewer than one instance up:
SIGKILL its app (restarted after 0.5-2 s), SIGTERM or SIGKILL its sidecar (restarted on
the same ports after 0.5-2 s), or SIGSTOP its app for 1-3 s. An instance counts as up
from `SETTLE` s after the soak saw its sidecar ready again until the soak next signals it.

The report says what a correct sidecar must never do (and `tests/test_soak.py` asserts):
a POST without an Idempotency-Key the apps received whole twice, a body that arrived
whole-framed with a different length (or content) for any method, a GET, PUT or keyed
POST that failed while two instances were up for its whole life, a failure whose sidecar
error code means the request never reached an app, a sidecar that exited without being
signalled, a Traceback in a sidecar's log. And, for information: failures by cause and by
the faults they overlapped, whether an app saw each failed request, how often idempotent
requests were delivered more than once (whole twice; cut by a fault, then whole), the
requests the caller tried more than once, the caller sidecar's fds and RSS before and
after, its retry and ejection counters.

Importable: `run_soak(seed, duration, workdir) -> SoakReport`. Every process it starts
runs in its own process group and is stopped on return, error or Ctrl-C; all logs, the
apps' records and every request (requests.jsonl) stay in the work directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent

SERVICE = "orders"
INSTANCES = 3
CLIENTS = 32
SETTLE = 1.5  # s an instance must have been ready before it counts as up
CLIENT_TIMEOUT = 10.0
MAX_BODY = 200 * 1024  # every body fits the sidecar's replay buffer (256 KiB)
# The request mix, by kind: GET (no body), POST without an Idempotency-Key (retried only when
# it never reached an app), PUT and POST with an Idempotency-Key (idempotent: retried after a
# reset, a 502/503/504 or a per-try timeout, the body replayed whole).
KINDS = (("GET", 0.30), ("POST", 0.30), ("PUT", 0.25), ("POST+key", 0.15))
IDEMPOTENT_KINDS = frozenset({"GET", "PUT", "POST+key"})
CHUNKED_SHARE = 0.5
# Share of the idempotent uploads (PUT, keyed POST) with a body that are sent slowly, in
# SLOW_PARTS parts with a pause of SLOW_PAUSE s before each but the first, so that a fault
# can land while the body is still arriving. (Under the caller's --per-try-timeout.)
SLOW_SHARE = 0.4
SLOW_PARTS = (3, 5)
SLOW_PAUSE = (0.05, 0.2)
PER_TRY_TIMEOUT = 2.0  # the caller sidecar's --per-try-timeout
FAULT_GAP = (2.0, 5.0)
RESTART_DELAY = (0.5, 2.0)
STOP_TIME = (1.0, 3.0)
FAULT_KINDS = ("kill_app", "term_sidecar", "kill_sidecar", "stop_app")
WARMUP = 1.5  # s of the same load before the soak, no faults (fills the pools)
GRACE_PERIOD = 5.0  # the orders sidecars' --grace-period
READY_TIMEOUT = 15.0
# Sidecar error codes of answers given without the request reaching any app.
NEVER_SENT_CODES = frozenset(
    {
        "upstream_connect_failed",
        "no_healthy_instance",
        "app_unhealthy",
        "upstream_pool_full",
        "draining",
        "service_overloaded",
        "too_many_connections",
        "registry_unavailable",
        "unknown_service",
    }
)
SAMPLES = 12  # request ids shown per group in the summary


class SoakError(RuntimeError):
    """The harness could not keep the setup running (not a finding about the sidecar)."""


# --- processes ----------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICRO_SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    return env


class Proc:
    """One program the soak runs, restartable; each run in its own process group.

    `stop()` (idempotent, synchronous) kills whatever is left of the group: it is what the
    tests' `procs` fixture calls, and what the soak calls on every way out.
    """

    def __init__(self, name: str, argv: list[str], out: Path, err: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.argv = argv
        self.cwd = cwd
        self.out, self.err = out, err
        self.popen: subprocess.Popen[bytes] | None = None
        self.expected_exit = False  # the soak signalled it (or is tearing down)
        self.stopped = False  # SIGSTOPped by the soak
        self.starting = False
        self.reported = False  # this run's unexpected exit is already in the report
        self.last_alive = 0.0
        self.runs: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def start(self) -> None:
        if self.alive():
            raise SoakError(f"{self.name} is still running")
        self.reap()
        stamp = f"=== soak: start {self.name} run {len(self.runs) + 1} at {time.time():.3f}\n".encode()
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            out.write(stamp)
            err.write(stamp)
            out.flush()
            err.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=err, cwd=self.cwd, env=_clean_env(), start_new_session=True
            )
        self.expected_exit = self.stopped = self.reported = False
        self.last_alive = time.monotonic()
        self.runs.append({"pid": self.popen.pid, "started": self.last_alive, "signals": []})

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def send(self, signum: int) -> None:
        """Signal the process (not its group); a terminating signal makes its exit expected."""
        if self.popen is None or self.popen.poll() is not None:
            return
        if signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            self.expected_exit = True
        if signum == signal.SIGSTOP:
            self.stopped = True
        elif signum == signal.SIGCONT:
            self.stopped = False
        self.runs[-1]["signals"].append(signal.Signals(signum).name)
        os.kill(self.popen.pid, signum)

    def reap(self) -> None:
        if self.popen is not None and self.popen.poll() is not None and "exit" not in self.runs[-1]:
            self.runs[-1]["exit"] = self.popen.returncode

    def stop(self, timeout: float = 5.0) -> None:
        stop_all([self], timeout)


def _exited(pid: int) -> bool:
    """Whether our child `pid` has exited, without reaping it (its group id stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def stop_all(procs: Iterable[Proc], timeout: float = 5.0) -> None:
    """SIGTERM every running process group at once, SIGKILL what is left after `timeout`,
    reap all. A group is only signalled while its leader is unreaped, so the id is ours."""
    running = [p for p in procs if p.popen is not None and p.popen.returncode is None]
    for p in running:
        assert p.popen is not None
        p.expected_exit = True
        for signum in (signal.SIGCONT, signal.SIGTERM):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signum)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_exited(p.popen.pid) for p in running if p.popen):
        time.sleep(0.02)
    for p in running:
        assert p.popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, signal.SIGKILL)  # the group: anything it left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(5)
        p.reap()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_ports(count: int) -> list[int]:
    """Free loopback ports below the ephemeral range, so that no outgoing connection takes
    one as its local port while a restarted process is not bound to it."""
    low = _ephemeral_low()
    lo, hi = (max(1024, low - 12000), low) if low > 13024 else (0, 0)
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(count * 50):
        if len(ports) == count:
            break
        port = rng.randrange(lo, hi) if hi else 0
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(s.getsockname()[1])
    if len(ports) != count:
        raise SoakError("could not find free ports")
    return ports


def proc_resources(pid: int | None) -> dict[str, int | None]:
    fds = rss = None
    if pid is not None:
        with contextlib.suppress(OSError):
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    return {"fds": fds, "rss_kib": rss}


# --- the setup ----------------------------------------------------------------------------


@dataclass
class Fault:
    n: int
    kind: str
    instance: int
    t_signal: float
    delay: float  # restart delay, or how long the app stays stopped
    t_restart: float | None = None
    t_ready: float | None = None
    settled: float | None = None
    notes: list[str] = field(default_factory=list)

    def window(self) -> tuple[float, float]:
        """From the signal until the instance counts as up again (inf if it never did)."""
        return self.t_signal, self.settled if self.settled is not None else math.inf

    def label(self) -> str:
        return f"{self.kind}@{self.instance}"


class Instance:
    def __init__(self, index: int, app: Proc, sidecar: Proc, ports: dict[str, int]) -> None:
        self.index = index
        self.id = f"{SERVICE}-{index}"
        self.app, self.sidecar = app, sidecar
        self.ports = ports
        self.settled: float | None = None  # counts as up from then (None: down)
        self.up: list[tuple[float, float]] = []  # closed up intervals
        self.busy = False  # a fault or a restore is in progress

    def is_up(self, now: float) -> bool:
        return not self.busy and self.settled is not None and now >= self.settled

    def mark_down(self, t: float) -> None:
        if self.settled is not None and t > self.settled:
            self.up.append((self.settled, t))
        self.settled = None

    def mark_ready(self, t: float) -> float:
        self.settled = t + SETTLE
        return self.settled

    def close(self, t: float) -> None:
        self.mark_down(t)

    def up_throughout(self, start: float, end: float) -> bool:
        return any(a <= start and end <= b for a, b in self.up)


@dataclass(slots=True)
class Req:
    id: str
    client: int
    kind: str  # GET | POST | PUT | POST+key (see KINDS)
    method: str
    framing: str  # none | length | chunked
    sent_length: int
    start: float
    slow: bool = False  # the body went in parts with pauses
    body_done: float = 0.0  # when the client had handed over the last byte of a slow body
    end: float = 0.0
    status: int | None = None
    error_code: str | None = None  # X-Sidecar-Error
    error_message: str | None = None
    exception: str | None = None
    instance: str | None = None  # that answered, from the app's body

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.exception is None

    @property
    def idempotent(self) -> bool:
        return self.kind in IDEMPOTENT_KINDS

    @property
    def latency(self) -> float:
        return self.end - self.start

    def cause(self) -> str:
        if self.exception is not None:
            return f"exception {self.exception.split(':', 1)[0]}"
        return f"{self.status} {self.error_code or '(app)'}"


class Soak:
    def __init__(
        self,
        seed: int,
        duration: float,
        workdir: Path,
        track: list[Any] | None,
        say: Callable[[str], None],
        sidecar_root: Path = ROOT,
    ) -> None:
        self.seed = seed
        self.sidecar_root = sidecar_root
        self.duration = duration
        self.workdir = workdir
        self.say = say
        self.logs = workdir / "logs"
        self.records = workdir / "records"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.records.mkdir(parents=True, exist_ok=True)
        self.registry = workdir / "registry.sqlite3"
        self.rng = random.Random(seed)
        self.t0 = 0.0  # monotonic start of the load
        self.wall_minus_mono = time.time() - time.monotonic()
        self.procs: list[Proc] = []
        self.track = track
        ports = pick_ports(INSTANCES * 3 + 4)
        self.instances: list[Instance] = []
        for i in range(INSTANCES):
            app_port, inbound, admin = ports[3 * i : 3 * i + 3]
            name = f"{SERVICE}-{i}"
            app = self._proc(f"{name}-app", self._app_argv(app_port, name))
            sidecar = self._proc(
                f"{name}-sidecar",
                [
                    *self._sidecar_argv(SERVICE, app_port, inbound, 0, admin),
                    "--id",
                    name,
                    "--grace-period",
                    str(GRACE_PERIOD),
                ],
            )
            self.instances.append(
                Instance(i, app, sidecar, {"app": app_port, "inbound": inbound, "admin": admin})
            )
        c_app, c_in, c_out, c_admin = ports[-4:]
        self.caller_ports = {"app": c_app, "inbound": c_in, "outbound": c_out, "admin": c_admin}
        self.caller_app = self._proc("caller-app", self._app_argv(c_app, "caller"))
        self.caller = self._proc(
            "caller-sidecar",
            [
                *self._sidecar_argv("caller", c_app, c_in, c_out, c_admin),
                "--per-try-timeout",
                f"{PER_TRY_TIMEOUT:g}",
            ],
        )
        self.faults: list[Fault] = []
        self.skipped_faults = 0
        self.fault_tasks: set[asyncio.Task[None]] = set()
        self.crashes: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.requests: list[Req] = []
        self.resources: dict[str, dict[str, int | None]] = {}
        self.metrics: dict[str, float] = {}
        self.session: aiohttp.ClientSession | None = None  # for the soak's own probes
        self.load_end = 0.0
        self.phases: dict[str, float] = {}  # seconds spent in each part of the run

    # -- processes --------------------------------------------------------------------

    def _proc(self, name: str, argv: list[str]) -> Proc:
        cwd = self.sidecar_root if name.endswith("sidecar") else ROOT  # `python -m sidecar` from there
        proc = Proc(name, argv, self.logs / f"{name}.out", self.logs / f"{name}.err", cwd)
        self.procs.append(proc)
        if self.track is not None:
            self.track.append(proc)
        return proc

    def _app_argv(self, port: int, instance: str) -> list[str]:
        log = self.records / f"{instance}.jsonl"
        return [
            sys.executable,
            "-m",
            "tests.apps.recording_app",
            "--port",
            str(port),
            "--log",
            str(log),
            "--instance",
            instance,
        ]

    def _sidecar_argv(self, name: str, app_port: int, inbound: int, outbound: int, admin: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sidecar",
            "--name",
            name,
            "--app-port",
            str(app_port),
            "--inbound-host",
            "127.0.0.1",
            "--inbound-port",
            str(inbound),
            "--outbound-port",
            str(outbound),
            "--admin-port",
            str(admin),
            "--registry-path",
            str(self.registry),
            "--health-interval",
            "0.2",
            "--drain-delay",
            "0.2",
            "--access-log",
            "json",
        ]

    def now(self) -> float:
        return time.monotonic()

    async def _status(self, url: str, timeout: float = 1.0) -> int | None:
        assert self.session is not None
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _start(self, proc: Proc, url: str, what: str, timeout: float = READY_TIMEOUT) -> None:
        """Start `proc` and wait until `url` answers 200; retry a start that exits at once
        (a port still held by the previous run), up to 10 times."""
        proc.starting = True
        try:
            for attempt in range(10):
                proc.start()
                deadline = self.now() + timeout
                while self.now() < deadline:
                    if not proc.alive():
                        break
                    if await self._status(url) == 200:
                        proc.last_alive = self.now()
                        return
                    await asyncio.sleep(0.05)
                else:
                    raise SoakError(f"{proc.name} not {what} within {timeout:.0f}s (see {proc.err})")
                proc.reap()
                rc = proc.returncode()
                tail = _tail(proc.err, 5)
                if rc == 2 or "in use" in tail:
                    self.notes.append(
                        f"{proc.name} exited {rc} at start (attempt {attempt + 1}): {tail[-200:]}"
                    )
                    await asyncio.sleep(0.3)
                    continue
                self.crashes.append(
                    {
                        "proc": proc.name,
                        "pid": proc.pid,
                        "rc": rc,
                        "t": self._rel(self.now()),
                        "when": "starting",
                        "log": tail,
                    }
                )
                await asyncio.sleep(0.3)
            raise SoakError(f"{proc.name} would not start (see {proc.err})")
        finally:
            proc.starting = False

    async def start_app(self, proc: Proc, port: int) -> None:
        await self._start(proc, f"http://127.0.0.1:{port}/health", "answering /health")

    async def start_sidecar(self, proc: Proc, admin: int) -> None:
        await self._start(proc, f"http://127.0.0.1:{admin}/ready", "ready")

    async def wait_ready(self, admin: int, timeout: float = READY_TIMEOUT) -> bool:
        deadline = self.now() + timeout
        while self.now() < deadline:
            if await self._status(f"http://127.0.0.1:{admin}/ready") == 200:
                return True
            await asyncio.sleep(0.05)
        return False

    async def restore(self, inst: Instance) -> float:
        """Bring both processes of `inst` back and wait until its sidecar is ready; the
        time it was seen ready."""
        for _ in range(3):
            if inst.app.stopped:
                inst.app.send(signal.SIGCONT)
            if not inst.app.alive():
                await self.start_app(inst.app, inst.ports["app"])
            if not inst.sidecar.alive():
                await self.start_sidecar(inst.sidecar, inst.ports["admin"])
            ready = await self.wait_ready(inst.ports["admin"])
            if ready and inst.app.alive() and inst.sidecar.alive() and not inst.app.stopped:
                return self.now()
        raise SoakError(f"instance {inst.index} did not come back")

    # -- faults -----------------------------------------------------------------------

    async def fault_loop(self, stop_at: float) -> None:
        next_at = self.t0 + self.rng.uniform(*FAULT_GAP)
        bag: list[str] = []
        while True:
            # The same draws in the same order every tick, whatever the state: same seed, same
            # plan. Kinds come from a shuffled bag of all four, so that every kind happens
            # within any four faults in a row, even in a short soak.
            if not bag:
                bag = list(FAULT_KINDS)
                self.rng.shuffle(bag)
            kind = bag.pop()
            pick = self.rng.random()
            delay = self.rng.uniform(*(STOP_TIME if kind == "stop_app" else RESTART_DELAY))
            gap = self.rng.uniform(*FAULT_GAP)
            if next_at >= stop_at:
                return
            await asyncio.sleep(max(0.0, next_at - self.now()))
            now = self.now()
            up = [inst for inst in self.instances if inst.is_up(now)]
            if len(up) >= 2:  # after this fault at least one instance is still up
                inst = up[min(len(up) - 1, int(pick * len(up)))]
                fault = Fault(len(self.faults) + 1, kind, inst.index, now, delay)
                self.faults.append(fault)
                inst.busy = True
                task = asyncio.create_task(self.run_fault(fault, inst), name=f"fault-{fault.n}")
                self.fault_tasks.add(task)
                task.add_done_callback(self.fault_tasks.discard)
            else:
                self.skipped_faults += 1
            next_at += gap

    async def run_fault(self, fault: Fault, inst: Instance) -> None:
        try:
            fault.t_signal = self.now()
            inst.mark_down(fault.t_signal)  # before the signal: the window is conservative
            if fault.kind == "kill_app":
                inst.app.send(signal.SIGKILL)
                await self._wait_exit(inst.app, 5.0, fault)
                await asyncio.sleep(max(0.0, fault.t_signal + fault.delay - self.now()))
            elif fault.kind in ("kill_sidecar", "term_sidecar"):
                inst.sidecar.send(signal.SIGKILL if fault.kind == "kill_sidecar" else signal.SIGTERM)
                await self._wait_exit(inst.sidecar, GRACE_PERIOD + 5.0, fault)
                rc = inst.sidecar.returncode()
                if fault.kind == "term_sidecar" and rc != 0:
                    fault.notes.append(f"sidecar exited {rc} after SIGTERM")
                await asyncio.sleep(max(0.0, fault.t_signal + fault.delay - self.now()))
            elif fault.kind == "stop_app":
                inst.app.send(signal.SIGSTOP)
                await asyncio.sleep(max(0.0, fault.t_signal + fault.delay - self.now()))
                inst.app.send(signal.SIGCONT)
            fault.t_restart = self.now()
            fault.t_ready = await self.restore(inst)
            fault.settled = inst.mark_ready(fault.t_ready)
        except Exception as exc:
            fault.notes.append(f"{type(exc).__name__}: {exc}")
            self.notes.append(f"fault {fault.n} ({fault.label()}): {type(exc).__name__}: {exc}")
        finally:
            inst.busy = False

    async def _wait_exit(self, proc: Proc, timeout: float, fault: Fault) -> None:
        deadline = self.now() + timeout
        while proc.alive() and self.now() < deadline:
            await asyncio.sleep(0.02)
        if proc.alive():
            fault.notes.append(f"{proc.name} still running {timeout:.0f}s after the signal: SIGKILL")
            proc.send(signal.SIGKILL)
            while proc.alive():
                await asyncio.sleep(0.02)
        proc.reap()

    async def watch(self) -> None:
        """Notice processes that exit without the soak having signalled them."""
        while True:
            self.check_exits()
            await asyncio.sleep(0.1)

    def check_exits(self) -> None:
        now = self.now()
        for proc in self.procs:
            if proc.popen is None or proc.starting:
                continue
            if proc.alive():
                proc.last_alive = now
                continue
            proc.reap()
            if proc.expected_exit or proc.reported:
                continue
            proc.reported = True
            self.crashes.append(
                {
                    "proc": proc.name,
                    "pid": proc.pid,
                    "rc": proc.returncode(),
                    "t": self._rel(now),
                    "when": "running",
                    "log": _tail(proc.err, 15),
                }
            )
            self.say(f"  ! {proc.name} (pid {proc.pid}) exited {proc.returncode()} without a signal")
            for inst in self.instances:
                if proc in (inst.app, inst.sidecar):
                    inst.mark_down(proc.last_alive)
                    if not inst.busy:
                        inst.busy = True
                        task = asyncio.create_task(self._recover(inst), name=f"recover-{inst.index}")
                        self.fault_tasks.add(task)
                        task.add_done_callback(self.fault_tasks.discard)
            if proc is self.caller or proc is self.caller_app:
                task = asyncio.create_task(self._recover_caller(), name="recover-caller")
                self.fault_tasks.add(task)
                task.add_done_callback(self.fault_tasks.discard)

    async def _recover(self, inst: Instance) -> None:
        try:
            inst.mark_ready(await self.restore(inst))
        except Exception as exc:
            self.notes.append(f"recovering instance {inst.index}: {type(exc).__name__}: {exc}")
        finally:
            inst.busy = False

    async def _recover_caller(self) -> None:
        try:
            if not self.caller_app.alive():
                await self.start_app(self.caller_app, self.caller_ports["app"])
            if not self.caller.alive():
                await self.start_sidecar(self.caller, self.caller_ports["admin"])
        except Exception as exc:
            self.notes.append(f"recovering the caller: {type(exc).__name__}: {exc}")

    # -- load -------------------------------------------------------------------------

    async def client(
        self,
        c: int,
        session: aiohttp.ClientSession,
        stop_at: float,
        block: bytes,
        out: list[Req],
        prefix: str,
    ) -> None:
        rng = random.Random(f"{self.seed}:{prefix}:{c}")
        base = f"http://127.0.0.1:{self.caller_ports['outbound']}/{SERVICE}"
        n = 0
        while self.now() < stop_at:
            n += 1
            rid = f"{prefix}{self.seed}-c{c:02d}-{n:05d}"
            draw = rng.random()
            kind = KINDS[-1][0]
            for name, share in KINDS:
                if draw < share:
                    kind = name
                    break
                draw -= share
            upload = kind != "GET"
            length = rng.randint(0, MAX_BODY) if upload else 0
            chunked = upload and rng.random() < CHUNKED_SHARE
            slow = upload and kind != "POST" and length > 0 and rng.random() < SLOW_SHARE
            offset = rng.randint(0, len(block) - length)
            sizes = [rng.randint(1024, 64 * 1024) for _ in range(length // 1024 + 1)] if chunked else []
            parts = _split(length, rng.randint(*SLOW_PARTS), rng) if slow else []
            pauses = [rng.uniform(*SLOW_PAUSE) for _ in parts[1:]]
            body = block[offset : offset + length]
            headers = {
                "X-Request-Id": rid,
                "X-Soak-Length": str(length),
                "X-Soak-Crc": f"{zlib.crc32(body):08x}",
            }
            if kind == "POST+key":
                headers["Idempotency-Key"] = f"key-{rid}"
            req = Req(
                rid,
                c,
                kind,
                "PUT" if kind == "PUT" else "GET" if kind == "GET" else "POST",
                "chunked" if chunked else "length" if upload else "none",
                length,
                self.now(),
                slow=slow,
            )
            data: Any = None
            if slow:
                if not chunked:  # aiohttp sends an async iterable chunked unless told the length
                    headers["Content-Length"] = str(length)
                data = self._slow_body(body, parts, pauses, req)
            elif upload:
                data = _chunks(body, sizes) if chunked else body
            out.append(req)
            try:
                async with session.request(
                    req.method,
                    f"{base}/{'orders' if upload else 'items'}/{n}",
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
                ) as resp:
                    raw = await resp.read()
                    req.status = resp.status
                    req.error_code = resp.headers.get("X-Sidecar-Error")
                    try:
                        answer = json.loads(raw)
                    except ValueError:
                        answer = {}
                    if isinstance(answer, dict):
                        if req.error_code is not None:
                            req.error_message = str(answer.get("message"))[:300]
                        else:
                            req.instance = answer.get("instance")
            except TimeoutError:
                req.exception = f"TimeoutError: no complete answer within {CLIENT_TIMEOUT:g}s"
            except (aiohttp.ClientError, OSError) as exc:
                req.exception = f"{type(exc).__name__}: {str(exc)[:200]}"
            req.end = self.now()

    async def _slow_body(
        self, body: bytes, parts: list[int], pauses: list[float], req: Req
    ) -> AsyncIterator[bytes]:
        at = 0
        for i, size in enumerate(parts):
            if i:
                await asyncio.sleep(pauses[i - 1])
            yield body[at : at + size]
            at += size
        req.body_done = self.now()

    async def run_load(self, duration: float, out: list[Req], prefix: str = "s") -> None:
        block = random.Random(self.seed).randbytes(MAX_BODY + 64 * 1024)
        connector = aiohttp.TCPConnector(limit=CLIENTS, force_close=False)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            # no silent second try of a GET on a reused connection: every failure is seen
            if hasattr(session, "_retry_connection"):
                session._retry_connection = False
            stop_at = self.now() + duration
            await asyncio.gather(
                *(self.client(c, session, stop_at, block, out, prefix) for c in range(CLIENTS))
            )

    # -- the run ----------------------------------------------------------------------

    def _rel(self, t: float) -> float:
        return round(t - self.t0, 3) if self.t0 else round(t, 3)

    async def run(self) -> SoakReport:
        began = self.now()
        async with aiohttp.ClientSession() as self.session:
            where = "" if self.sidecar_root == ROOT else f", sidecar from {self.sidecar_root}"
            self.say(f"soak: seed {self.seed}, {self.duration:g} s, workdir {self.workdir}{where}")
            await asyncio.gather(
                *(self.start_app(inst.app, inst.ports["app"]) for inst in self.instances),
                self.start_app(self.caller_app, self.caller_ports["app"]),
            )
            await asyncio.gather(
                *(self.start_sidecar(inst.sidecar, inst.ports["admin"]) for inst in self.instances),
                self.start_sidecar(self.caller, self.caller_ports["admin"]),
            )
            ready_at = self.now()
            for inst in self.instances:
                inst.mark_ready(ready_at)
            watcher = asyncio.create_task(self.watch(), name="watch")
            try:
                warm: list[Req] = []
                await self.run_load(WARMUP, warm, prefix="warm")
                seen = {r.instance for r in warm if r.ok}
                for i in range(50):
                    if len(seen) >= INSTANCES:
                        break
                    more: list[Req] = []
                    await self.run_load(0.2, more, prefix=f"warm{i}-")
                    seen |= {r.instance for r in more if r.ok}
                bad_warm = [r for r in warm if not r.ok]
                if bad_warm:
                    causes = Counter(r.cause() for r in bad_warm)
                    self.notes.append(f"{len(bad_warm)} of {len(warm)} warm-up requests failed: {causes}")
                await asyncio.sleep(0.3)
                start = self.resources["start"] = proc_resources(self.caller.pid)
                self.say(
                    f"  up: 3 x {SERVICE} + caller; warm-up: {len(warm)} requests reached "
                    f"{sorted(x for x in seen if x)}; caller fds {start['fds']}, RSS {start['rss_kib']} KiB"
                )
                self.t0 = self.now()
                self.phases["setup"] = round(self.t0 - began, 2)
                faults = asyncio.create_task(self.fault_loop(self.t0 + self.duration), name="faults")
                progress = asyncio.create_task(self._progress(), name="progress")
                try:
                    await self.run_load(self.duration, self.requests)
                finally:
                    self.load_end = self.now()
                    progress.cancel()
                    faults.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await faults
                # let running faults finish their restore (bounded)
                deadline = self.now() + 40
                while self.fault_tasks and self.now() < deadline:
                    await asyncio.sleep(0.1)
                if self.fault_tasks:
                    self.notes.append(f"{len(self.fault_tasks)} fault(s) still restoring at the end")
                self.check_exits()
                await asyncio.sleep(0.5)
                self.resources["end"] = proc_resources(self.caller.pid)
                self.metrics = await self._caller_metrics()
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                for task in list(self.fault_tasks):
                    task.cancel()
            self.check_exits()
        end = self.now()
        self.phases["load"] = round(self.load_end - self.t0, 2)
        self.phases["wind_down"] = round(end - self.load_end, 2)
        for inst in self.instances:
            inst.close(end)
        report = self.report()
        self.phases["report"] = round(self.now() - end, 2)
        return report

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(10)
            done = [r for r in self.requests if r.end]
            failed = sum(1 for r in done if not r.ok)
            up = sum(inst.is_up(self.now()) for inst in self.instances)
            self.say(
                f"  t={self.now() - self.t0:5.1f}s requests {len(done)}, failed {failed}, "
                f"faults {len(self.faults)}, up now {up}"
            )

    async def _caller_metrics(self) -> dict[str, float]:
        assert self.session is not None
        wanted = (
            "sidecar_retries_total",
            "sidecar_retry_budget_exhausted_total",
            "sidecar_ejections_total",
        )
        found: dict[str, float] = {}
        try:
            async with self.session.get(
                f"http://127.0.0.1:{self.caller_ports['admin']}/metrics",
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.notes.append(f"caller /metrics: {exc}")
            return found
        for line in text.splitlines():
            for name in wanted:
                if line.startswith(name) and f'service="{SERVICE}"' in line:
                    with contextlib.suppress(ValueError):
                        found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    # -- the report -------------------------------------------------------------------

    def report(self) -> SoakReport:
        return build_report(self)

    def sidecar_logs(self) -> list[Path]:
        return [
            p for proc in (self.caller, *(i.sidecar for i in self.instances)) for p in (proc.out, proc.err)
        ]


async def _chunks(body: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    at = 0
    for size in sizes:
        if at >= len(body):
            break
        yield body[at : at + size]
        at += size
    if at < len(body):
        yield body[at:]


def _split(length: int, count: int, rng: random.Random) -> list[int]:
    """`length` bytes in `count` parts of random sizes (fewer when the body is tiny)."""
    count = max(1, min(count, length))
    cuts = sorted(rng.sample(range(1, length), count - 1)) if count > 1 else []
    edges = [0, *cuts, length]
    return [b - a for a, b in itertools.pairwise(edges)]


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 20000))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- analysis -----------------------------------------------------------------------------


@dataclass
class SoakReport:
    seed: int
    duration: float
    workdir: str
    requests: int
    failed: int
    by_method: dict[str, dict[str, int]]
    failures_by_cause: dict[str, dict[str, int]]  # cause -> {total, whole, partial, none}
    failures_by_fault_at_start: dict[str, dict[str, int]]
    failures_by_fault_overlapping: dict[str, dict[str, int]]
    duplicate_posts: list[dict[str, Any]]
    cut_bodies: list[dict[str, Any]]
    corrupt_bodies: list[dict[str, Any]]
    idempotent_failed_two_up: list[dict[str, Any]]
    never_sent_failures: list[dict[str, Any]]
    crashes: list[dict[str, Any]]
    tracebacks: list[dict[str, Any]]
    # for information
    posts_redelivered_after_partial: list[dict[str, Any]]
    idempotent_deliveries: dict[str, dict[str, int]]  # kind -> counts (see summary)
    idempotent_redelivered: list[dict[str, Any]]  # delivered whole twice, or cut then whole
    retried: dict[str, dict[str, int]]  # kind -> requests the caller tried more than once
    aborted_bodies: dict[str, int]
    failure_samples: dict[str, list[dict[str, Any]]]  # cause -> the first few
    app_tracebacks: list[dict[str, Any]]
    unexpected_records: int
    faults: list[dict[str, Any]]
    faults_by_kind: dict[str, int]
    skipped_faults: int
    availability: dict[str, Any]
    latency_ms: dict[str, float]
    caller: dict[str, Any]
    phases: dict[str, float]
    notes: list[str]

    CHECKS = (
        ("duplicate_posts", "POSTs without an Idempotency-Key the apps received whole more than once"),
        ("cut_bodies", "bodies that arrived whole-framed with another length (any method)"),
        ("corrupt_bodies", "bodies of the right length with other bytes (CRC, any method)"),
        (
            "idempotent_failed_two_up",
            "GETs, PUTs, keyed POSTs failed while >= 2 instances were up throughout",
        ),
        ("never_sent_failures", "failures with a never-reached-an-app error code"),
        ("crashes", "sidecar/app exits without a signal from the soak"),
        ("tracebacks", "Tracebacks in sidecar logs"),
    )

    def problems(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name, _ in self.CHECKS}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["problems"] = self.problems()
        return data

    def summary(self) -> str:
        out: list[str] = []
        w = out.append
        w(f"soak seed {self.seed}: {self.duration:g} s of load, {CLIENTS} clients, workdir {self.workdir}")
        w(f"requests: {self.requests}, failed: {self.failed}")
        for method, counts in sorted(self.by_method.items()):
            total = sum(counts.values())
            parts = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            w(f"  {method:<8} {total:>6}: {parts}")
        lat = self.latency_ms
        w(f"latency ms (ok requests): p50 {lat.get('p50')}, p99 {lat.get('p99')}, max {lat.get('max')}")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.faults_by_kind.items()))
        w(f"faults: {len(self.faults)} ({kinds}); skipped {self.skipped_faults} (fewer than two up)")
        av = self.availability
        w(
            f"instances up (share of load time): all 3 {av['share_3']:.0%}, 2 {av['share_2']:.0%}, "
            f"1 {av['share_1']:.0%}, 0 {av['share_0']:.0%}"
        )
        if self.failures_by_cause:
            w("failures by cause (an app recorded it: whole / only a cut body / no app recorded it):")
            for cause, c in sorted(self.failures_by_cause.items(), key=lambda kv: -kv[1]["total"]):
                w(f"  {cause:<44} {c['total']:>5}  ({c['whole']} / {c['partial']} / {c['none']})")
            w("failures by fault active at their start:")
            for label, c in sorted(
                self.failures_by_fault_at_start.items(), key=lambda kv: -sum(kv[1].values())
            ):
                w(
                    f"  {label:<24} "
                    + ", ".join(f"{k} x{v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))
                )
            w("failures by fault overlapping their life:")
            for label, c in sorted(
                self.failures_by_fault_overlapping.items(), key=lambda kv: -sum(kv[1].values())
            ):
                w(
                    f"  {label:<24} "
                    + ", ".join(f"{k} x{v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))
                )
            w("failure samples (t: s into the load; caller: attempts@instance; inbound: instance:status):")
            for cause, items in sorted(self.failure_samples.items()):
                w(f"  {cause}:")
                for item in items[:3]:
                    w(f"    {_brief(item)}")
        w("checks:")
        for name, text in self.CHECKS:
            items = getattr(self, name)
            mark = "ok  " if not items else "FAIL"
            w(f"  {mark} {len(items):>5}  {text}")
            for item in items[:SAMPLES]:
                w(f"           {_brief(item) if 'framing' in item else _one_line(item)}")
            if len(items) > SAMPLES:
                w(f"           ... {len(items) - SAMPLES} more (see --json)")
        w("for information:")
        w(
            "  POSTs without an Idempotency-Key delivered in part, then again whole: "
            f"{len(self.posts_redelivered_after_partial)}"
        )
        for item in self.posts_redelivered_after_partial[:SAMPLES]:
            w(f"           {_brief(item)}")
        w(
            "  idempotent requests at the apps (recorded by an app / delivered whole more than once "
            "(extra whole deliveries) / cut, then whole / only cut):"
        )
        for kind, c in sorted(self.idempotent_deliveries.items()):
            w(
                f"    {kind:<8} {c['recorded']:>6} / {c['whole_twice']} ({c['extra_whole']}) / "
                f"{c['cut_then_whole']} / {c['cut_only']}"
            )
        for item in self.idempotent_redelivered[:SAMPLES]:
            w(f"           {_brief(item)}")
        if len(self.idempotent_redelivered) > SAMPLES:
            w(f"           ... {len(self.idempotent_redelivered) - SAMPLES} more (see --json)")
        w(
            "  tried more than once by the caller (requests / answered 200 / slow uploads / "
            "slow uploads with a fault signalled mid-upload):"
        )
        for kind, c in sorted(self.retried.items()):
            w(f"    {kind:<8} {c['retried']:>6} / {c['ok']} / {c['slow']} / {c['slow_fault_mid_upload']}")
        ab = ", ".join(f"{k} x{v}" for k, v in sorted(self.aborted_bodies.items())) or "none"
        w(f"  bodies cut by a broken connection at an app (by fault overlapping): {ab}")
        w(f"  app tracebacks: {len(self.app_tracebacks)}; unknown ids recorded: {self.unexpected_records}")
        caller = self.caller
        s, e = caller["resources"].get("start", {}), caller["resources"].get("end", {})
        w(
            f"caller sidecar: fds {s.get('fds')} -> {e.get('fds')}, "
            f"RSS {s.get('rss_kib')} -> {e.get('rss_kib')} KiB; "
            f"retries {caller['metrics'].get('sidecar_retries_total', 0):g}, "
            f"budget exhausted {caller['metrics'].get('sidecar_retry_budget_exhausted_total', 0):g}, "
            f"ejections {caller['metrics'].get('sidecar_ejections_total', 0):g}"
        )
        w("seconds: " + ", ".join(f"{k} {v:g}" for k, v in self.phases.items()))
        for note in self.notes:
            w(f"note: {note}")
        return "\n".join(out)


def _brief(item: dict[str, Any]) -> str:
    """One failed request in a line: what the client, the sidecars and the apps saw."""
    caller = item.get("caller") or {}
    parts = [
        item["id"],
        f"{item['method']} {item['framing']} {item['sent']}B -> {item['result']}",
        f"t={item['t'][0]:.2f}-{item['t'][1]:.2f}",
        f"caller={caller.get('attempts')}@{caller.get('instance')}" if caller else "caller=-",
        f"inbound={','.join(item.get('inbound', [])) or '-'}",
        f"apps={','.join(item['apps']) or '-'}",
        f"faults={','.join(item['faults']) or '-'}",
    ]
    parts += [
        f"{k}={item[k]}" for k in ("copies", "at", "received", "app_framing", "app_saw_it") if k in item
    ]
    parts.append(f"up={item.get('up_throughout')}")
    detail = item.get("message") or item.get("exception")
    if detail:
        parts.append(f"({detail[:90]})")
    return " ".join(parts)


def _one_line(item: dict[str, Any]) -> str:
    return json.dumps(item, separators=(",", ":"), default=str)[:600]


TRACEBACK_RE = re.compile(r"^Traceback \(most recent call last\):", re.M)


def find_tracebacks(paths: Iterable[Path]) -> list[dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for match in TRACEBACK_RE.finditer(text):
            lines = text[match.start() :].splitlines()[:60]
            block = [lines[0]]
            for line in lines[1:]:
                block.append(line)
                if line and not line.startswith((" ", "\t", "Traceback", "During handling", "The above")):
                    break
            key = (path.name, block[-1])
            entry = found.setdefault(
                key, {"file": path.name, "error": block[-1][:300], "count": 0, "text": "\n".join(block)}
            )
            entry["count"] += 1
    return list(found.values())


def _access_lines(path: Path) -> Iterable[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)
    except OSError:
        return


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000, 1)


def build_report(soak: Soak) -> SoakReport:
    reqs = soak.requests
    t0 = soak.t0
    by_id = {r.id: r for r in reqs}
    # what the apps received
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    unexpected = 0
    for path in sorted(soak.records.glob("*.jsonl")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    soak.notes.append(f"unreadable record line in {path.name}: {line[:100]!r}")
                    continue
                rid = rec.get("request_id") or ""
                if rid in by_id:
                    records[rid].append(rec)
                elif not rid.startswith("warm"):
                    unexpected += 1
    for recs in records.values():
        recs.sort(key=lambda x: float(x.get("time") or 0))  # deliveries in the order they ended
    # what the sidecars logged, for the samples
    caller_log = {
        e.get("request_id"): e for e in _access_lines(soak.caller.out) if e.get("direction") == "outbound"
    }
    inbound_log: dict[str, list[str]] = defaultdict(list)
    for inst in soak.instances:
        for e in _access_lines(inst.sidecar.out):
            if e.get("direction") == "inbound":
                inbound_log[e.get("request_id") or ""].append(f"{inst.index}:{e.get('status')}")

    fault_windows = [(f, *f.window()) for f in soak.faults]

    def faults_during(start: float, end: float) -> list[Fault]:
        return [f for f, a, b in fault_windows if a <= end and start < b]

    def faults_at(t: float) -> list[Fault]:
        return [f for f, a, b in fault_windows if a <= t < b]

    def label(fs: list[Fault]) -> str:
        return "+".join(sorted({f.kind for f in fs})) or "none"

    def up_count(r: Req) -> int:
        return sum(inst.up_throughout(r.start, r.end) for inst in soak.instances)

    def sample(r: Req, **extra: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": r.id,
            "method": r.kind,
            "framing": r.framing + (" slow" if r.slow else ""),
            "sent": r.sent_length,
            "result": r.cause(),
            "t": [round(r.start - t0, 3), round(r.end - t0, 3)],
        }
        if r.error_message:
            entry["message"] = r.error_message
        if r.exception:
            entry["exception"] = r.exception
        caller = caller_log.get(r.id)
        if caller is not None:
            entry["caller"] = {k: caller.get(k) for k in ("status", "attempts", "instance", "duration_ms")}
        if inbound_log.get(r.id):
            entry["inbound"] = inbound_log[r.id]
        recs = records.get(r.id, [])
        entry["apps"] = [
            f"{x.get('instance')}:{x.get('body_length')}/{x.get('expected_length')}"
            + ("" if x.get("complete") else " cut")
            for x in recs
        ]
        entry["faults"] = [f.label() for f in faults_during(r.start, r.end)]
        entry["up_throughout"] = up_count(r)
        entry.update(extra)
        return entry

    by_method: dict[str, Counter[str]] = defaultdict(Counter)
    by_cause: dict[str, Counter[str]] = defaultdict(Counter)
    at_start: dict[str, Counter[str]] = defaultdict(Counter)
    overlapping: dict[str, Counter[str]] = defaultdict(Counter)
    failure_samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    idem_two_up: list[dict[str, Any]] = []
    never_sent: list[dict[str, Any]] = []
    done = [r for r in reqs if r.end]
    for r in done:
        by_method[r.kind]["200" if r.ok else r.cause()] += 1
        if r.ok:
            continue
        cause = f"{r.kind} {r.cause()}"
        recs = records.get(r.id, [])
        recorded = bool(recs)
        seen = "whole" if any(x.get("complete") for x in recs) else "partial" if recs else "none"
        by_cause[cause]["total"] += 1
        by_cause[cause][seen] += 1
        at_start[label(faults_at(r.start))][cause] += 1
        overlapping[label(faults_during(r.start, r.end))][cause] += 1
        if len(failure_samples[cause]) < SAMPLES:
            failure_samples[cause].append(sample(r))
        if r.idempotent and up_count(r) >= 2:
            idem_two_up.append(sample(r))
        if r.error_code in NEVER_SENT_CODES:
            never_sent.append(sample(r, app_saw_it=recorded))
    for counts in by_cause.values():
        for key in ("whole", "partial", "none"):
            counts.setdefault(key, 0)

    duplicates: list[dict[str, Any]] = []
    redelivered: list[dict[str, Any]] = []
    cut: list[dict[str, Any]] = []
    corrupt: list[dict[str, Any]] = []
    aborted: Counter[str] = Counter()
    mono = soak.wall_minus_mono
    deliveries: dict[str, Counter[str]] = {k: Counter() for k, _ in KINDS if k in IDEMPOTENT_KINDS}
    idem_again: list[dict[str, Any]] = []
    for rid, recs in records.items():
        r = by_id[rid]
        whole = [x for x in recs if x.get("complete")]
        if r.kind == "POST":
            if len(whole) > 1:
                duplicates.append(sample(r, copies=len(whole)))
            elif whole and len(recs) > len(whole):
                redelivered.append(sample(r))
        elif r.idempotent:
            counts = deliveries[r.kind]
            counts["recorded"] += 1
            first_whole = min((float(x.get("time", 0)) for x in whole), default=math.inf)
            cut_first = any(float(x.get("time", 0)) <= first_whole for x in recs if not x.get("complete"))
            if len(whole) > 1:
                counts["whole_twice"] += 1
                counts["extra_whole"] += len(whole) - 1
            if whole and cut_first:
                counts["cut_then_whole"] += 1
            if not whole:
                counts["cut_only"] += 1
            if len(whole) > 1 or (whole and cut_first):
                idem_again.append(sample(r, copies=len(whole)))
        for x in recs:
            if not x.get("complete"):
                t = float(x.get("time", 0)) - mono
                aborted[label(faults_during(t - 1.0, t))] += 1
                continue
            if x.get("expected_length") is not None and x.get("body_length") != x.get("expected_length"):
                cut.append(
                    sample(
                        r, at=x.get("instance"), received=x.get("body_length"), app_framing=x.get("framing")
                    )
                )
            elif x.get("crc_ok") is False:
                corrupt.append(sample(r, at=x.get("instance"), app_framing=x.get("framing")))

    retried: dict[str, Counter[str]] = defaultdict(Counter)
    signals = [f.t_signal for f in soak.faults]
    for r in done:
        attempts = (caller_log.get(r.id) or {}).get("attempts")
        if not isinstance(attempts, int) or attempts < 2:
            continue
        counts = retried[r.kind]
        counts["retried"] += 1
        counts["ok"] += r.ok
        if r.slow:
            counts["slow"] += 1
            upload_end = r.body_done or r.end
            counts["slow_fault_mid_upload"] += any(r.start <= t <= upload_end for t in signals)
    for counts in deliveries.values():
        for key in ("recorded", "whole_twice", "extra_whole", "cut_then_whole", "cut_only"):
            counts.setdefault(key, 0)
    for counts in retried.values():
        for key in ("retried", "ok", "slow", "slow_fault_mid_upload"):
            counts.setdefault(key, 0)

    app_logs = [
        p for proc in (soak.caller_app, *(i.app for i in soak.instances)) for p in (proc.out, proc.err)
    ]
    sidecar_names = {soak.caller.name, *(i.sidecar.name for i in soak.instances)}
    crashes = list(soak.crashes)
    for proc in soak.procs:
        for run in proc.runs:
            if (
                proc.name in sidecar_names
                and run.get("exit") not in (0, None)
                and "SIGKILL" not in run["signals"]
            ):
                if any(c["pid"] == run["pid"] for c in crashes):
                    continue
                soak.notes.append(f"{proc.name} pid {run['pid']} exited {run['exit']} after {run['signals']}")

    ok_latencies = sorted(r.latency for r in done if r.ok)
    # availability: share of the load time with N instances up
    shares = Counter[int]()
    end = soak.load_end or (t0 + soak.duration)
    step = 0.05
    t = t0
    while t < end:
        shares[sum(any(a <= t < b for a, b in inst.up) for inst in soak.instances)] += 1
        t += step
    total_steps = sum(shares.values()) or 1

    return SoakReport(
        seed=soak.seed,
        duration=soak.duration,
        workdir=str(soak.workdir),
        requests=len(done),
        failed=sum(1 for r in done if not r.ok),
        by_method={m: dict(c) for m, c in by_method.items()},
        failures_by_cause={k: dict(v) for k, v in by_cause.items()},
        failures_by_fault_at_start={k: dict(v) for k, v in at_start.items()},
        failures_by_fault_overlapping={k: dict(v) for k, v in overlapping.items()},
        duplicate_posts=duplicates,
        cut_bodies=cut,
        corrupt_bodies=corrupt,
        idempotent_failed_two_up=idem_two_up,
        never_sent_failures=never_sent,
        crashes=crashes,
        tracebacks=find_tracebacks(soak.sidecar_logs()),
        posts_redelivered_after_partial=redelivered,
        idempotent_deliveries={k: dict(v) for k, v in deliveries.items()},
        idempotent_redelivered=idem_again,
        retried={k: dict(v) for k, v in retried.items()},
        aborted_bodies=dict(aborted),
        failure_samples=dict(failure_samples),
        app_tracebacks=find_tracebacks(app_logs),
        unexpected_records=unexpected,
        faults=[
            {
                "n": f.n,
                "kind": f.kind,
                "instance": f.instance,
                "t_signal": round(f.t_signal - t0, 3),
                "delay": round(f.delay, 3),
                "t_restart": None if f.t_restart is None else round(f.t_restart - t0, 3),
                "t_ready": None if f.t_ready is None else round(f.t_ready - t0, 3),
                "notes": f.notes,
            }
            for f in soak.faults
        ],
        faults_by_kind=dict(Counter(f.kind for f in soak.faults)),
        skipped_faults=soak.skipped_faults,
        availability={f"share_{n}": shares[n] / total_steps for n in range(INSTANCES + 1)}
        | {
            "up_intervals": {
                i.index: [[round(a - t0, 3), round(b - t0, 3)] for a, b in i.up] for i in soak.instances
            }
        },
        latency_ms={
            "p50": _percentile(ok_latencies, 0.5) or 0.0,
            "p99": _percentile(ok_latencies, 0.99) or 0.0,
            "max": _percentile(ok_latencies, 1.0) or 0.0,
        },
        caller={"resources": soak.resources, "metrics": soak.metrics, "pid": soak.caller.pid},
        phases=soak.phases,
        notes=soak.notes,
    )


def _write_requests(soak: Soak) -> None:
    with open(soak.workdir / "requests.jsonl", "w", encoding="utf-8") as f:
        for r in soak.requests:
            row = {f.name: getattr(r, f.name) for f in fields(Req)}
            row["start"] = round(r.start - soak.t0, 4)
            row["end"] = round(r.end - soak.t0, 4)
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def run_soak(
    seed: int = 1,
    duration: float = 120.0,
    workdir: Path | str | None = None,
    *,
    track: list[Any] | None = None,
    say: Callable[[str], None] = print,
    sidecar_root: Path | str = ROOT,
) -> SoakReport:
    """Run the soak and return its report. `track`, when given (the tests' `procs`), gets
    every process the soak starts, so that its owner can stop them too. `sidecar_root` is
    the directory the sidecars run `python -m sidecar` in (another checkout to compare)."""
    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(seed, duration, workdir, track, say, Path(sidecar_root).resolve())
    try:
        report = asyncio.run(soak.run())
    finally:
        began = time.monotonic()
        # sidecars first, so that none of them sees its app go before it stops
        stop_all([p for p in soak.procs if p.name.endswith("sidecar")])
        stop_all(soak.procs)
        soak.phases["teardown"] = round(time.monotonic() - began, 2)
        if soak.requests:
            _write_requests(soak)
    report.tracebacks = find_tracebacks(soak.sidecar_logs())  # the final stop included
    for proc in (soak.caller, *(i.sidecar for i in soak.instances)):
        last = proc.runs[-1] if proc.runs else {}
        if last.get("exit") not in (0, None):
            report.notes.append(f"{proc.name} exited {last.get('exit')} on the final SIGTERM")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="logs and records (default: a new temp dir)"
    )
    parser.add_argument(
        "--sidecar-root",
        type=Path,
        default=ROOT,
        help="run `python -m sidecar` in this directory (e.g. an unpacked older commit; default: this repo)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 3600:
        parser.error("--duration must be between 1 and 3600 seconds")

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        report = run_soak(args.seed, args.duration, workdir, sidecar_root=args.sidecar_root)
    except KeyboardInterrupt:
        print(f"interrupted: every process stopped; logs in {workdir}", file=sys.stderr)
        return 130
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        print(f"report written to {args.json}")
    return 1 if any(report.problems().values()) else 0


if __name__ == "__main__":
    sys.exit(main())
