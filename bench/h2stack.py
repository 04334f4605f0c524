"""The HTTP/2 and gRPC rows of bench/run.py: their processes, their checks and h2load.

    grpc-direct     h2load -> gRPC backend                                   (no proxy: a sanity row)
    grpc-nginx      h2load -> nginx grpc_pass -> backend                     (the reference, one hop)
    grpc-sidecar    h2load -> sidecar inbound (--app-protocol h2c) -> backend          (one hop)
    grpc-mesh       h2load -> sidecar A outbound (:authority echo) -> sidecar B inbound -> backend
    grpc-mesh-mtls  the same two hops, A -> B over mutual TLS (--mtls permissive, the default)
    h2-sidecar      h2load -> sidecar inbound (HTTP/2 in, HTTP/1.1 to the app) -> app /small
    h2-nginx        h2load -> nginx (`listen ... http2`, proxy_pass HTTP/1.1) -> app /small

Every client is h2load over h2c with prior knowledge (no TLS on the client's hop). A gRPC
call is a POST of one framed message (bench/h2report.framed) with content-type
application/grpc and te: trailers; the backend answers one framed message and grpc-status
0 in the trailers. h2load counts HTTP statuses only, and a failed gRPC call is an HTTP 200
without a message: so each gRPC target is checked with a grpcio client (grpc-status OK,
the message, and the caller the backend saw) before it is measured and after the run, and
each cell counts the calls answered without a message (see h2report.unanswered).

The sidecars other than grpc-mesh-mtls's run with `--mtls off`; gRPC's B with
`--app-protocol h2c` and a TCP-connect health probe (`--health-path ""`). The app of the
h2 rows is the HTTP/1.1 app of bench/stack.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import stack as httpstack
from h2report import (
    GRPC_HEADERS,
    GRPC_TARGETS,
    REPLY_PAYLOAD,
    REQUEST_PAYLOAD,
    UNARY_PATH,
    cell_failure,
    framed,
    grpc_proxy_server,
    h2load_argv,
    load_label,
    parse_h2load,
    parse_h2load_log,
    unanswered,
    write_message,
)
from harness import (
    ADDRESS_IN_USE_RE,
    BENCH,
    ROOT,
    SMALL_BODY,
    Harness,
    PortTaken,
    Proc,
    children_cpu_seconds,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    on_free_ports,
    wait_http,
)
from report import median_row

GRPC_SERVICE = "echo"  # sidecar B's service name in the gRPC mesh rows: A's :authority
H2_SERVICE = "h2app"  # the h2-sidecar's service name
CALLER_PATH = "/bench.Echo/Caller"
SMALL_PATH = "/small"
GRPC_BACKENDS = ("auto", "node", "python")


@dataclass
class H2Target:
    name: str
    kind: str  # "grpc": unary calls to the gRPC backend; "h2": GETs of the HTTP/1.1 app's /small
    port: int
    authority: str | None = None  # the :authority to send; None: 127.0.0.1:<port>
    procs: list[Proc] = field(default_factory=list)  # the proxy processes (none for grpc-direct)
    caller: str = ""  # the x-sidecar-caller that the backend must be told (grpc rows)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{UNARY_PATH if self.kind == 'grpc' else SMALL_PATH}"

    @property
    def reply_len(self) -> int:
        """DATA bytes of one answer: the framed message, or the app's small body."""
        return len(framed(REPLY_PAYLOAD)) if self.kind == "grpc" else len(SMALL_BODY)


@dataclass
class H2Stack:
    targets: dict[str, H2Target]
    failed: dict[str, str]  # target -> why it is not measured, or its numbers are not to be read
    message: Path  # the request body of a gRPC call (h2load -d)
    backend: Proc | None = None
    backend_kind: str = ""  # node or python
    app_pid: int = 0  # the HTTP/1.1 app of the h2 rows
    checks: dict[str, dict[str, str | None]] = field(default_factory=dict)  # before/after, by target

    def app_pids(self, target: H2Target) -> list[int]:
        if target.kind == "grpc":
            return [self.backend.pid] if self.backend else []
        return [self.app_pid]


# --- the gRPC backend ----------------------------------------------------------------------


def node_modules_with_grpc_js() -> Path | None:
    """A node_modules that holds @grpc/grpc-js: $BENCH_NODE_PATH, bench/node_modules, or the
    Node example's (read from, never installed into)."""
    candidates = [
        os.environ.get("BENCH_NODE_PATH"),
        BENCH / "node_modules",
        ROOT / "examples/node/node_modules",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "@grpc" / "grpc-js" / "package.json").is_file():
            return Path(candidate)
    return None


def backend_kind(choice: str) -> str:
    """`auto`: Node's @grpc/grpc-js when node and the package are there (about twice grpcio's
    calls per core here), else grpcio."""
    if choice == "auto":
        return "node" if shutil.which("node") and node_modules_with_grpc_js() else "python"
    if choice == "node" and not (shutil.which("node") and node_modules_with_grpc_js()):
        raise RuntimeError(
            "--grpc-backend node: no node, or no @grpc/grpc-js in $BENCH_NODE_PATH, bench/node_modules "
            "or examples/node/node_modules"
        )
    return choice


def start_backend(harness: Harness, kind: str, core: int) -> tuple[Proc, int]:
    def start() -> tuple[Proc, int]:
        port = free_port()
        if kind == "node":
            modules = node_modules_with_grpc_js()
            proc = harness.start(
                "grpc-backend",
                ["node", str(BENCH / "grpc_backend.js"), str(port)],
                core=core,
                env={"NODE_PATH": str(modules)},
            )
        else:
            proc = harness.start(
                "grpc-backend",
                [sys.executable, str(BENCH / "grpc_backend.py"), str(port), "8"],
                core=core,
            )
        wait_grpc(H2Target("grpc-direct", "grpc", port), [proc])
        return proc, port

    return on_free_ports(start)


# --- checks --------------------------------------------------------------------------------


def grpc_call(port: int, authority: str | None, method: str, payload: bytes, timeout: float = 5.0) -> bytes:
    """One unary call with grpcio, raw bytes both ways; raises grpc.RpcError on a status
    other than OK."""
    options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
    if authority:
        options.append(("grpc.default_authority", authority))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        reply: bytes = channel.unary_unary(method)(payload, timeout=timeout)
        return reply


def check_grpc(target: H2Target) -> str | None:
    """None when a sample call through `target` has grpc-status OK, the backend's message,
    and the backend was told the caller the row says (x-sidecar-caller); else what was wrong."""
    try:
        reply = grpc_call(target.port, target.authority, UNARY_PATH, REQUEST_PAYLOAD)
        if reply != REPLY_PAYLOAD:
            return f"{UNARY_PATH} answered {reply[:100]!r}, not {REPLY_PAYLOAD!r}"
        seen = grpc_call(target.port, target.authority, CALLER_PATH, b"").decode(errors="replace")
    except grpc.RpcError as exc:
        code, details = getattr(exc, "code", lambda: None)(), getattr(exc, "details", lambda: "")()
        return f"grpc-status {getattr(code, 'name', code)}: {details}"
    if seen != target.caller:
        how = f"the verified caller {target.caller!r}" if target.caller else "no verified caller"
        return f"the backend was told x-sidecar-caller {seen!r}, not {how}"
    return None


def check_h2(target: H2Target, harness: Harness) -> str | None:
    """None when 20 HTTP/2 GETs through `target` (h2load, one connection) all got a 2xx with the
    app's body; else what h2load saw."""
    n = 20
    argv = h2load_argv(target.url, 1, 1, requests=n, authority=target.authority)
    try:
        text, _ = run_h2load(harness, f"check-{target.name}", argv, 30)
        s = parse_h2load(text)
    except (RuntimeError, ValueError) as exc:
        return str(exc).splitlines()[0]
    if s["succeeded"] != n or s["bytes_data"] != n * len(SMALL_BODY):
        return (
            f"{s['succeeded']} of {n} GETs succeeded ({s['status_2xx']} 2xx, {s['status_4xx']} 4xx, "
            f"{s['status_5xx']} 5xx, {s['errored']} errored), {s['bytes_data']} body bytes"
        )
    return None


def check(target: H2Target, harness: Harness) -> str | None:
    return check_grpc(target) if target.kind == "grpc" else check_h2(target, harness)


def _dead(procs: list[Proc]) -> Proc | None:
    return next((p for p in procs if not p.alive()), None)


def wait_grpc(target: H2Target, procs: list[Proc], timeout: float = 30.0) -> None:
    """Until a sample call through `target` passes check_grpc."""
    deadline = time.monotonic() + timeout
    last: str | None = "no call made"
    while time.monotonic() < deadline:
        dead = _dead(procs)
        if dead:
            tail = dead.log_tail()
            if ADDRESS_IN_USE_RE.search(tail):
                raise PortTaken(f"{dead.name} exited {dead.popen.returncode}: a port it was given was taken")
            raise RuntimeError(f"{dead.name} exited {dead.popen.returncode}:\n{tail}")
        last = check_grpc(target)
        if last is None:
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}:\n{p.log_tail(8)}" for p in procs)
    raise RuntimeError(f"{target.name}: no good gRPC call after {timeout:g} s ({last})\n{tails}")


def wait_h2(target: H2Target, procs: list[Proc], harness: Harness, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: str | None = "no request made"
    while time.monotonic() < deadline:
        dead = _dead(procs)
        if dead:
            tail = dead.log_tail()
            if ADDRESS_IN_USE_RE.search(tail):
                raise PortTaken(f"{dead.name} exited {dead.popen.returncode}: a port it was given was taken")
            raise RuntimeError(f"{dead.name} exited {dead.popen.returncode}:\n{tail}")
        last = check_h2(target, harness)
        if last is None:
            return
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}:\n{p.log_tail(8)}" for p in procs)
    raise RuntimeError(f"{target.name}: no good HTTP/2 GET after {timeout:g} s ({last})\n{tails}")


# --- the targets ---------------------------------------------------------------------------


def _sidecar(
    harness: Harness,
    label: str,
    service: str,
    app_port: int,
    registry: Path,
    core: int,
    access_log: bool,
    mtls: str,
    h2c_app: bool,
) -> tuple[Proc, tuple[int, int, int]]:
    """A sidecar started and ready (/ready), not yet checked through."""
    ports = httpstack._sidecar_ports()
    extra = ["--app-protocol", "h2c"] if h2c_app else []
    proc = httpstack._start_sidecar(
        harness,
        label,
        service,
        app_port,
        ports,
        registry,
        core,
        access_log,
        mtls,
        extra=extra,
        health_path="" if h2c_app else "/health",
    )
    wait_http(f"http://127.0.0.1:{ports[2]}/ready", proc)
    return proc, ports


def _grpc_pair(
    harness: Harness,
    names: list[str],
    suffix: str,
    backend_port: int,
    app_port: int,
    registry: Path,
    core: int,
    access_log: bool,
    mtls: str,
    caller: str,
) -> dict[str, H2Target]:
    """B (service `echo`, in front of the backend) and, for a mesh row, A (`client`) whose
    outbound port reaches B by :authority; the targets among `names`, each checked."""
    out: dict[str, H2Target] = {}

    def start_b() -> tuple[Proc, int]:
        label = f"grpc-sidecar-b{suffix}"
        b, ports = _sidecar(
            harness, label, GRPC_SERVICE, backend_port, registry, core, access_log, mtls, True
        )
        if f"grpc-sidecar{suffix}" in names:
            wait_grpc(H2Target("grpc-sidecar", "grpc", ports[0]), [b])
        return b, ports[0]

    b, inbound = on_free_ports(start_b)
    if f"grpc-sidecar{suffix}" in names:
        out["grpc-sidecar"] = H2Target("grpc-sidecar", "grpc", inbound, None, [b])
    mesh = f"grpc-mesh{suffix}"
    if mesh in names:

        def start_a() -> tuple[Proc, int]:
            label = f"grpc-sidecar-a{suffix}"
            client = httpstack.CLIENT_NAME
            a, ports = _sidecar(harness, label, client, app_port, registry, core, access_log, mtls, False)
            target = H2Target(mesh, "grpc", ports[1], GRPC_SERVICE, [a, b], caller)
            wait_grpc(target, [a, b])
            return a, ports[1]

        a, outbound = on_free_ports(start_a)
        out[mesh] = H2Target(mesh, "grpc", outbound, GRPC_SERVICE, [a, b], caller)
    return out


def start_h2_stack(
    harness: Harness,
    names: list[str],
    app: Proc,
    app_port: int,
    proxy_core: int,
    app_core: int,
    backend_choice: str = "auto",
    access_log: bool = False,
) -> H2Stack:
    """The targets in `names` (of h2report.H2_TARGETS) in front of a new gRPC backend and the
    HTTP/1.1 app already running on `app_port`. A sidecar target that does not start or
    does not pass its first check is listed in `failed`, not raised: the other rows go on."""
    work = harness.workdir / "h2"
    work.mkdir(parents=True, exist_ok=True)
    st = H2Stack({}, {}, write_message(work / "unary.msg"), app_pid=app.pid)
    if any(n in GRPC_TARGETS for n in names):
        st.backend_kind = backend_kind(backend_choice)
        st.backend, backend_port = start_backend(harness, st.backend_kind, app_core)
        if "grpc-direct" in names:
            st.targets["grpc-direct"] = H2Target("grpc-direct", "grpc", backend_port)

        if "grpc-nginx" in names:

            def start_nginx() -> tuple[Proc, int]:
                port = free_port()
                server = grpc_proxy_server(port, backend_port)
                proc = httpstack._start_nginx(
                    harness, "grpc-nginx", work / "grpc-nginx", server, proxy_core, access_log
                )
                wait_grpc(H2Target("grpc-nginx", "grpc", port), [proc])
                return proc, port

            proc, port = on_free_ports(start_nginx)
            st.targets["grpc-nginx"] = H2Target("grpc-nginx", "grpc", port, None, [proc])

        for suffix, mtls, caller in (("", "off", ""), ("-mtls", "permissive", httpstack.CLIENT_NAME)):
            wanted = [n for n in (f"grpc-sidecar{suffix}", f"grpc-mesh{suffix}") if n in names]
            if not wanted:
                continue
            registry_dir = work / f"grpc{suffix or '-plain'}"
            registry_dir.mkdir(mode=0o700)
            try:
                pair = _grpc_pair(
                    harness,
                    wanted,
                    suffix,
                    backend_port,
                    app_port,
                    registry_dir / "registry.sqlite3",
                    proxy_core,
                    access_log,
                    mtls,
                    caller,
                )
                st.targets.update(pair)
            except RuntimeError as exc:
                for n in wanted:
                    st.failed[n] = f"did not start: {exc}"
                print(f"{', '.join(wanted)}: {exc}", flush=True)

    if "h2-sidecar" in names:

        def start_h2_sidecar() -> tuple[Proc, int]:
            registry = work / "h2-registry.sqlite3"
            proc, ports = _sidecar(
                harness, "h2-sidecar", H2_SERVICE, app_port, registry, proxy_core, access_log, "off", False
            )
            wait_h2(H2Target("h2-sidecar", "h2", ports[0]), [proc], harness)
            return proc, ports[0]

        try:
            proc, port = on_free_ports(start_h2_sidecar)
            st.targets["h2-sidecar"] = H2Target("h2-sidecar", "h2", port, None, [proc])
        except RuntimeError as exc:
            st.failed["h2-sidecar"] = f"did not start: {exc}"
            print(f"h2-sidecar: {exc}", flush=True)

    if "h2-nginx" in names:

        def start_h2_nginx() -> tuple[Proc, int]:
            port = free_port()
            server = httpstack._proxy_server(port, app_port, http2=True)
            proc = httpstack._start_nginx(
                harness, "h2-nginx", work / "h2-nginx", server, proxy_core, access_log
            )
            wait_h2(H2Target("h2-nginx", "h2", port), [proc], harness)
            return proc, port

        proc, port = on_free_ports(start_h2_nginx)
        st.targets["h2-nginx"] = H2Target("h2-nginx", "h2", port, None, [proc])

    st.targets = {n: st.targets[n] for n in names if n in st.targets}
    return st


# --- h2load --------------------------------------------------------------------------------


def run_h2load(harness: Harness, name: str, argv: list[str], timeout: float) -> tuple[str, float]:
    """One bounded h2load run (its own core set by the caller's argv or taskset): its output
    and its CPU seconds. Killed after `timeout` seconds if still running."""
    before = children_cpu_seconds()
    proc = harness.start(f"h2load-{name}", argv, stop_signal=signal.SIGKILL)
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        pass  # killed below; the missing summary says so
    finally:
        proc.stop()
        harness.procs.remove(proc)
    text = proc.log_path.read_text(errors="replace")
    if proc.popen.returncode not in (0, None) and "finished in" not in text:
        raise RuntimeError(f"h2load {name} exited {proc.popen.returncode}:\n{text[-1500:]}")
    return text, children_cpu_seconds() - before


def _taskset(core: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *argv]


def measure_h2(
    harness: Harness,
    st: H2Stack,
    target: H2Target,
    clients: int,
    streams: int,
    duration: int,
    load_core: int,
    app_on_load_core: bool,
) -> dict[str, Any]:
    """One timed h2load run against `target`; CPU of the proxy and the app read from /proc
    around it, the latencies from h2load's per-request log."""
    label = load_label(clients, streams)
    log = harness.workdir / f"h2load-{target.name}-{label}.tsv"
    grpc_call_ = target.kind == "grpc"
    argv = h2load_argv(
        target.url,
        clients,
        streams,
        duration=duration,
        data=st.message if grpc_call_ else None,
        headers=GRPC_HEADERS if grpc_call_ else (),
        authority=target.authority,
        log_file=log,
    )
    app_pids = st.app_pids(target)
    cpu0, app0, busy0 = cpu_seconds(target.pids), cpu_seconds(app_pids), machine_busy_seconds()
    t0 = time.monotonic()
    text, load_cpu = run_h2load(harness, f"{target.name}-{label}", _taskset(load_core, argv), duration + 30)
    wall = time.monotonic() - t0
    busy = machine_busy_seconds() - busy0
    proxy_cpu, app_cpu = cpu_seconds(target.pids) - cpu0, cpu_seconds(app_pids) - app0
    s = parse_h2load(text)
    lat = parse_h2load_log(log.read_text(errors="replace")) if log.exists() else {}
    log.unlink(missing_ok=True)
    n = s["done"]
    secs = max(s["duration_s"], 1e-6)
    # h2load's "failed" holds its "errored" and non-2xx answers; a gRPC error is a 200 without
    # a message, which only the DATA bytes show.
    errors = max(n - s["succeeded"], unanswered(s, target.reply_len)) + s["timeout"]

    def ms(us: float | None) -> float | None:
        return None if us is None else us / 1000

    load = load_cpu + (app_cpu if app_on_load_core else 0.0)
    return {
        "requests": n,
        "rps": n / secs,
        "mean_ms": ms(s["mean_us"]),
        "sd_ms": ms(s["sd_us"]),
        "p50_ms": ms(lat.get("p50_us")),
        "p99_ms": ms(lat.get("p99_us")),
        "max_ms": ms(lat.get("max_us", s["max_us"])),
        "errors": errors,
        "reply_bytes": s["bytes_data"] / n if n else None,
        "cpu_us": proxy_cpu * 1e6 / n if target.pids and n else None,
        "app_cpu_us": app_cpu * 1e6 / n if n else None,
        "load_core_pct": 100 * load / wall,
        "proxy_core_pct": 100 * proxy_cpu / wall if target.pids else None,
        "others_pct": max(0.0, 100 * (busy - proxy_cpu - app_cpu - load_cpu) / wall),
    }


def warm(
    harness: Harness, st: H2Stack, target: H2Target, clients: int, streams: int, seconds: int, core: int
) -> None:
    """Load like a cell's, not measured: the proxies' upstream pools grow to the cell's count."""
    grpc_call_ = target.kind == "grpc"
    argv = h2load_argv(
        target.url,
        clients,
        streams,
        duration=seconds,
        data=st.message if grpc_call_ else None,
        headers=GRPC_HEADERS if grpc_call_ else (),
        authority=target.authority,
    )
    run_h2load(harness, f"warm-{target.name}", _taskset(core, argv), seconds + 30)


def describe(row: dict[str, Any]) -> str:
    parts = [f"{row['rps']:,.0f} calls/s"]
    if row["p99_ms"] is not None:
        parts.append(f"p99 {row['p99_ms']:.2f} ms")
    if row["cpu_us"] is not None:
        parts.append(f"{row['cpu_us']:.0f} us/call")
    if row["reply_bytes"] is not None:
        parts.append(f"{row['reply_bytes']:.1f} B/reply")
    if row["errors"]:
        parts.append(f"{row['errors']} errors")
    return ", ".join(parts)


def run_h2_matrix(
    harness: Harness,
    st: H2Stack,
    loads: list[tuple[int, int]],
    *,
    duration: int,
    repeat: int,
    cell_warmup: int,
    load_core: int,
    app_on_load_core: bool,
) -> dict[str, Any]:
    """Every load (clients x streams) against every target, `repeat` times, cells interleaved
    by target; each target checked (check_grpc / check_h2) before the first cell and after
    the last. A target whose check fails, whose processes die, or whose cell had failed calls
    (h2report.cell_failure) is marked failed and not measured further."""
    for name, target in st.targets.items():
        if name in st.failed:
            continue
        why = check(target, harness)
        st.checks.setdefault(name, {})["before"] = why
        if why:
            st.failed[name] = f"check before the run: {why}"
    live = [t for t in st.targets.values() if t.name not in st.failed]
    print(f"warming up ({len(live)} HTTP/2 targets) ...", flush=True)
    for t in live:
        warm(harness, st, t, 16, 1, 1, load_core)
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(repeat):
        for clients, streams in loads:
            label = load_label(clients, streams)
            for t in live:
                if t.name in st.failed:
                    continue
                key = f"h2/{t.name}/{label}"
                try:
                    if cell_warmup:
                        warm(harness, st, t, clients, streams, cell_warmup, load_core)
                        time.sleep(1)
                    row = measure_h2(harness, st, t, clients, streams, duration, load_core, app_on_load_core)
                except (RuntimeError, ValueError) as exc:
                    st.failed[t.name] = f"{key}: {str(exc).splitlines()[0]}"
                    print(f"[{rep + 1}/{repeat}] {key:<26} FAILED: {exc}", flush=True)
                    continue
                dead = _dead(t.procs)
                why = cell_failure(row)
                if dead:
                    st.failed[t.name] = f"{dead.name} died during {key}: {dead.log_tail(5)}"
                elif why:  # no later cell of it: a proxy that failed calls is not measured on
                    st.failed[t.name] = f"{key}: {why}"
                runs.setdefault(key, []).append(row)
                print(f"[{rep + 1}/{repeat}] {key:<26} {describe(row)}", flush=True)
                time.sleep(1)
    for t in live:
        if t.name in st.failed:
            continue
        why = check(t, harness)
        st.checks.setdefault(t.name, {})["after"] = why
        if why:
            st.failed[t.name] = f"check after the run: {why}"
    medians = {key: median_row(rows) for key, rows in runs.items()}
    return {
        "backend": st.backend_kind,
        "runs": runs,
        "medians": medians,
        "failed": dict(st.failed),
        "checks": st.checks,
    }
