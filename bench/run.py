"""Side-by-side benchmark of issues 7 and 13: direct, one sidecar, the mesh path in plaintext
and over mutual TLS, and nginx doing the same hops; and, by name, the same for gRPC unary
calls and plain HTTP/2 (the grpc-* and h2-* targets, driven by h2load).

    python bench/run.py [--quick] [--repeat N] [--duration S] [--json FILE] [--profile FILE]
    python bench/run.py --targets http2 [--h2-conns 16x1,16x16]   # every gRPC and HTTP/2 row

See bench/README.md for what each column means. Everything runs on loopback, every load
run is bounded in time, and every process this starts is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from h2report import (
    H2_TARGETS,
    REPLY_PAYLOAD,
    framed,
    h2_ratio_table,
    h2_ratios,
    h2_table,
    load_label,
    parse_load,
)
from h2stack import GRPC_BACKENDS, run_h2_matrix, start_h2_stack
from harness import (
    BIG,
    ROOT,
    Harness,
    MiB,
    cpu_seconds,
    ensure_debian_packages,
    ensure_py_spy,
    machine_busy_seconds,
    raise_fd_limit,
    rss_kib,
    rss_with_keepalive,
    run_wrk,
    tool_version,
)
from report import (
    handshake_summary,
    handshake_table,
    median_row,
    mtls_ratios,
    mtls_table,
    profile_summary,
    profile_text,
    scaling_table,
    small_table,
    transfer_table,
    verdict_table,
    verdicts,
)
from stack import Stack, Target, start_stack
from tls import client_for, measure_handshakes

ALL_TARGETS = ["direct", "sidecar", "mesh", "mesh-mtls", "nginx", "nginx-2hop", "nginx-tls", "workers"]
# The HTTP/2 rows (bench/h2stack.py) run only when named: `--targets http2` names them all.
TARGET_GROUPS = {"http2": H2_TARGETS, "grpc": [t for t in H2_TARGETS if t.startswith("grpc-")]}
PATHS = {"small": "/small", "download": "/10m", "upload": "/upload"}
REPLY_MESSAGE = framed(REPLY_PAYLOAD)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per cell, 1 repeat")
    p.add_argument("--repeat", type=int, help="full runs to take medians over (default 3; 1 with --quick)")
    p.add_argument("--duration", type=int, help="whole seconds per cell (default 8; 2 with --quick)")
    p.add_argument("--json", type=Path, help="also write every run and the medians here")
    p.add_argument("--conns", default="1,16,64,1000", help="connection counts for the small response")
    p.add_argument(
        "--cell-warmup",
        type=int,
        help="seconds of load at a small cell's connection count before it is measured "
        "(default 2; 1 with --quick; 0: none, as before issue 13)",
    )
    p.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help="subset of " + ",".join(ALL_TARGETS + H2_TARGETS) + " (default: the HTTP/1.1 ones); "
        "`http2` names every gRPC and HTTP/2 row, `grpc` the gRPC ones",
    )
    p.add_argument(
        "--h2-conns",
        default="16x1,16x16",
        help="h2load loads for the HTTP/2 rows: CLIENTSxSTREAMS (connections x concurrent streams each)",
    )
    p.add_argument(
        "--grpc-backend",
        choices=GRPC_BACKENDS,
        default="auto",
        help="the gRPC rows' backend: node (@grpc/grpc-js), python (grpcio); auto: node if found",
    )
    p.add_argument("--proxy-core", type=int, default=0, help="core for the sidecars and nginx proxy")
    p.add_argument("--load-core", type=int, default=1, help="core for wrk (and this driver)")
    p.add_argument("--app-core", type=int, default=1, help="core for the upstream app")
    p.add_argument("--workers", type=int, default=2, help="processes of the `workers` target (--workers N)")
    p.add_argument(
        "--workers-cores", help="taskset core list for the `workers` target (default: the first N cores)"
    )
    p.add_argument("--keepalive-conns", type=int, default=1000, help="idle connections for the RSS column")
    p.add_argument(
        "--handshake-clients",
        type=int,
        default=4,
        help="openssl s_time processes at once for the new-connection rate (on --load-core)",
    )
    p.add_argument("--profile", type=Path, help="py-spy the one-hop sidecar at 16 conns; raw stacks here")
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument("--profile-only", action="store_true", help="skip the matrix, only --profile")
    p.add_argument(
        "--access-log",
        action="store_true",
        help="let the proxies log each request (sidecar: JSON on stdout, nginx: a file); default: off",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (path printed)")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 8)
    if args.cell_warmup is None:
        args.cell_warmup = 1 if args.quick else 2
    args.conns = [int(c) for c in args.conns.split(",") if c]
    args.targets = list(
        dict.fromkeys(x for t in args.targets.split(",") if t for x in TARGET_GROUPS.get(t, [t]))
    )
    try:
        args.h2_conns = parse_load(args.h2_conns)
    except ValueError as exc:
        p.error(f"--h2-conns: {exc}")
    if args.handshake_clients < 1:
        p.error("--handshake-clients must be at least 1")
    if args.workers < 2:
        p.error("--workers must be at least 2 (the sidecar row is the one-process case)")
    args.workers_cores = args.workers_cores or ",".join(
        str(c) for c in range(min(args.workers, os.cpu_count() or 1))
    )
    unknown = set(args.targets) - set(ALL_TARGETS) - set(H2_TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.profile_only and not args.profile:
        p.error("--profile-only needs --profile FILE")
    if args.profile and "sidecar" not in args.targets:
        args.targets.append("sidecar")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def machine_info() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "sidecar"], cwd=ROOT, capture_output=True, text=True
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "nginx": tool_version(["nginx", "-v"]),
        "wrk": tool_version(["wrk", "-v"]),
        "h2load": tool_version(["h2load", "--version"]),
        "openssl": tool_version(["openssl", "version"]),  # nginx's and s_time's
        "python_ssl": ssl.OPENSSL_VERSION,  # the sidecars'
        "sidecar_commit": commit.stdout.strip() or "?",
        "sidecar_dirty": bool(dirty.stdout.strip()),  # uncommitted changes under sidecar/ were measured
    }


def wrk_timeout(duration: int) -> int:
    """wrk leaves latencies above its timeout out of the percentiles and counts them as timeouts;
    5 s, but short enough that a connection never served within the run is still counted."""
    return max(1, min(5, round(duration * 0.6)))  # wrk takes whole seconds


def measure(
    harness: Harness, stack: Stack, target: Target, kind: str, conns: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One wrk run against one target; CPU of the proxy and the app read from /proc around it."""
    app_pids = [stack.app.pid]
    cpu0, app0 = cpu_seconds(target.pids), cpu_seconds(app_pids)
    busy0 = machine_busy_seconds()
    t0 = time.monotonic()
    w = run_wrk(
        harness,
        target.url(PATHS[kind]),
        conns,
        args.duration,
        args.load_core,
        upload_bytes=BIG if kind == "upload" else 0,
        timeout_s=wrk_timeout(args.duration),
    )
    wall = time.monotonic() - t0
    busy = machine_busy_seconds() - busy0
    proxy_cpu, app_cpu = cpu_seconds(target.pids) - cpu0, cpu_seconds(app_pids) - app0
    for proc in target.procs:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} died during {kind}/{target.name}/{conns}:\n{proc.log_tail()}")
    n = w["requests"]
    secs = max(w["duration_us"], 1) / 1e6
    load_cpu = w["wrk_cpu_s"] + (app_cpu if args.app_core == args.load_core else 0.0)
    row: dict[str, Any] = {
        "requests": n,
        "rps": n / secs,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "errors": w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["status_errors"],
        "timeouts": w["timeouts"],
        "cpu_us": proxy_cpu * 1e6 / n if target.pids and n else None,
        "app_cpu_us": app_cpu * 1e6 / n if n else None,
        "load_core_pct": 100 * load_cpu / wall,
        "proxy_core_pct": 100 * proxy_cpu / wall if target.pids else None,
        # CPU that neither the proxy, the app nor wrk used: other tenants of this machine.
        "others_pct": max(0.0, 100 * (busy - proxy_cpu - app_cpu - w["wrk_cpu_s"]) / wall),
        "mib_s": None,
    }
    if kind == "download":
        row["mib_s"] = w["bytes"] / secs / MiB
    elif kind == "upload":
        row["mib_s"] = n * BIG / secs / MiB
    return row


def describe(row: dict[str, Any]) -> str:
    parts = [f"{row['rps']:,.0f} req/s", f"p50 {row['p50_ms']:.2f} ms", f"p99 {row['p99_ms']:.2f} ms"]
    if row["mib_s"] is not None:
        parts.insert(0, f"{row['mib_s']:,.0f} MiB/s")
    if row["cpu_us"] is not None:
        parts.append(f"{row['cpu_us']:.0f} us/req")
    if row["errors"] or row["timeouts"]:
        parts.append(f"{row['errors']} errors {row['timeouts']} timeouts")
    return ", ".join(parts)


def run_matrix(harness: Harness, stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    targets = list(stack.targets.values())
    runs: dict[str, list[dict[str, Any]]] = {}
    rss: dict[str, dict[str, list[int]]] = {t.name: {} for t in targets}
    for t in targets:
        if t.pids:
            rss[t.name]["idle_kib"] = [rss_kib(t.pids)]

    print(f"warming up ({len(targets)} targets) ...", flush=True)
    for t in targets:
        run_wrk(harness, t.url(PATHS["small"]), 16, 1, args.load_core)
        run_wrk(harness, t.url(PATHS["download"]), 1, 1, args.load_core)

    cells = [("small", c) for c in args.conns] + [("download", 1), ("upload", 1)]
    for rep in range(args.repeat):
        for kind, conns in cells:
            for t in targets:
                key = f"{kind}/{t.name}/{conns}"
                if kind == "small" and args.cell_warmup:
                    # Grow the proxies' upstream pools to this count first: a pool left idle
                    # since this target's last cell has shrunk (the sidecar's in 4 s), and
                    # on a TLS hop each new pooled connection is a full handshake.
                    run_wrk(harness, t.url(PATHS["small"]), conns, args.cell_warmup, args.load_core)
                    time.sleep(1)  # the warm-up's closing connections do not bill the cell
                row = measure(harness, stack, t, kind, conns, args)
                runs.setdefault(key, []).append(row)
                print(f"[{rep + 1}/{args.repeat}] {key:<22} {describe(row)}", flush=True)
                time.sleep(1)  # let one cell's closing connections not bill the next
        for t in targets:
            if not t.pids:
                continue
            held = rss_with_keepalive(t.port, f"{t.prefix}/small", args.keepalive_conns, t.pids)
            rss[t.name].setdefault("keepalive_kib", []).append(held["rss_kib"])
            rss[t.name].setdefault("keepalive_failed", []).append(held["failed"])
            print(
                f"[{rep + 1}/{args.repeat}] rss/{t.name:<16} {held['rss_kib'] / 1024:.1f} MiB with "
                f"{held['opened']} keep-alive connections ({held['failed']} failed)",
                flush=True,
            )
            time.sleep(1)  # let one cell's closing connections not bill the next
    time.sleep(2)
    for t in targets:
        if t.pids:
            rss[t.name]["after_kib"] = [rss_kib(t.pids)]

    medians = {key: median_row(rows) for key, rows in runs.items()}
    rss_medians = {name: {k: statistics.median(v) for k, v in m.items()} for name, m in rss.items()}
    return {"runs": runs, "medians": medians, "rss_runs": rss, "rss": rss_medians}


def run_handshakes(harness: Harness, stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """New mutual-TLS connections per second against sidecar B's inbound port (mesh-mtls) and
    nginx's back (nginx-tls), the same client for both: `openssl s_time -new` with a client
    certificate from the CA each server trusts, `--handshake-clients` of them at once for
    `--duration` seconds, `--repeat` times."""
    clients, probes = {}, {}
    for name, server in stack.tls.items():
        cert, key, seen = client_for(harness.workdir, name, server)
        clients[name] = (cert, key)
        probes[name] = {"server": f"{server.label} :{server.port}", **seen}
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeat):
        for name, server in stack.tls.items():
            row = measure_handshakes(
                harness,
                name,
                server,
                clients[name],
                args.duration,
                args.load_core,
                [stack.app.pid],
                args.app_core == args.load_core,
                args.handshake_clients,
            )
            runs.setdefault(name, []).append(row)
            print(
                f"[{rep + 1}/{args.repeat}] handshakes/{name:<12} {row['per_s']:,.0f} conn/s, "
                f"{row['cpu_us']:,.0f} us/conn ({row['connections']} connections)",
                flush=True,
            )
            time.sleep(1)
    medians = {name: median_row(rows) for name, rows in runs.items()}
    return {"probes": probes, "runs": runs, "medians": medians, "summary": handshake_summary(medians)}


def run_profile(harness: Harness, stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    py_spy = ensure_py_spy()
    target = stack.targets["sidecar"]
    pid = stack.sidecars["b"].pid
    seconds = int(max(args.profile_seconds, 1))
    print(f"profiling sidecar pid {pid} for {seconds} s at 16 conns ...", flush=True)
    wrk = harness.start(
        "wrk-profile",
        [
            "wrk",
            "-t1",
            "-c16",
            f"-d{seconds + 5}s",
            "-s",
            str(Path(__file__).parent / "wrk.lua"),
            target.url(PATHS["small"]),
        ],
        core=args.load_core,
        stop_signal=signal.SIGKILL,
    )
    try:
        time.sleep(1.5)
        argv = [
            "taskset",
            "-c",
            str(args.load_core),
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(args.profile),
        ]
        spy = harness.start("py-spy", argv)
        spy.popen.wait(seconds + 60)
        if spy.popen.returncode != 0:
            raise RuntimeError(f"py-spy failed:\n{spy.log_tail()}")
        wrk.popen.wait(seconds + 30)
    finally:
        wrk.stop()
    summary = profile_summary(args.profile.read_text())
    print(profile_text(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Also when started in the background of a non-interactive shell, which ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    http1 = [t for t in args.targets if t in ALL_TARGETS]
    http2 = [t for t in args.targets if t in H2_TARGETS]
    ensure_debian_packages(["wrk", "nginx", *(["nghttp2-client"] if http2 else [])])
    if not shutil.which("taskset"):
        print("taskset (util-linux) is required", file=sys.stderr)
        return 2
    cpus = os.cpu_count() or 1
    if max(args.proxy_core, args.load_core, args.app_core) >= cpus:
        print(f"only {cpus} cores: use --proxy-core/--load-core/--app-core below {cpus}", file=sys.stderr)
        return 2
    raise_fd_limit()
    os.sched_setaffinity(0, {args.load_core})  # this driver stays off the proxy's core
    info = machine_info()
    print(
        f"{info['date']}  {info['cpu']} x{info['cpus']}  load {info['loadavg_start'][0]:.2f}  "
        f"{info['nginx']}  sidecar {info['sidecar_commit']}{'+dirty' if info['sidecar_dirty'] else ''}\n"
        f"cores: proxy {args.proxy_core}, wrk {args.load_core}, app {args.app_core}; "
        f"{args.duration:g} s per cell, {args.repeat} repeat(s)",
        flush=True,
    )
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="micro-sidecar-bench-"))
    harness = Harness(workdir)
    result: dict[str, Any] = {"machine": info, "settings": {k: str(v) for k, v in vars(args).items()}}
    try:
        stack = start_stack(
            harness,
            http1,
            args.proxy_core,
            args.app_core,
            args.access_log,
            workers=args.workers,
            workers_cores=args.workers_cores,
        )
        h2st = None
        if http2 and not args.profile_only:
            h2st = start_h2_stack(
                harness,
                http2,
                stack.app,
                stack.app_port,
                args.proxy_core,
                args.app_core,
                args.grpc_backend,
                args.access_log,
            )
        if not args.profile_only and stack.targets:
            result.update(run_matrix(harness, stack, args))
            if stack.tls:
                result["handshakes"] = run_handshakes(harness, stack, args)
            med, rss = result["medians"], result["rss"]
            names = list(stack.targets)
            result["verdicts"] = verdicts(med, rss)
            print()
            print(f"small response ({len(b'hello, world') + 1} bytes), medians of {args.repeat} run(s):")
            print(small_table(med, names, args.conns))
            print()
            print("10 MiB transfers (1 connection) and memory:")
            print(transfer_table(med, rss, names))
            print()
            print("issue 7 targets (ratio = target / nginx, same run):")
            print(verdict_table(result["verdicts"]))
            if {"mesh-mtls", "nginx-tls"} & set(names):
                result["mtls"] = mtls_ratios(med, args.conns)
                print()
                print("issue 13: mutual TLS, proxy CPU us/request of the two-hop paths (same run):")
                print(mtls_table(result["mtls"]))
            if stack.tls:
                hs = result["handshakes"]
                print()
                print(
                    f"new mutual-TLS connections ({args.handshake_clients} x openssl s_time -new, client "
                    f"certificate, GET /small HTTP/1.0), medians of {args.repeat} run(s):"
                )
                print(handshake_table(hs["medians"], hs["probes"]))
                sm = hs["summary"]
                if sm["ratio"] is not None:
                    print(
                        f"sidecar / nginx: {sm['ratio']:.2f}x conn/s (issue 13 target {sm['target']}: "
                        f"{sm['verdict']}); {sm['cpu_bound_ratio']:.2f}x at one core each "
                        "(nginx's CPU per connection / the sidecar's)"
                    )
            if "workers" in names and "sidecar" in names:
                print()
                print(
                    f"--workers {args.workers} on cores {args.workers_cores} against one sidecar process on "
                    f"core {args.proxy_core} (wrk and the app on core {args.load_core}):"
                )
                print(scaling_table(med, args.conns, args.workers))
        if h2st is not None:
            print(
                f"HTTP/2 rows: h2load -t1 on core {args.load_core}, gRPC backend {h2st.backend_kind or '-'} "
                f"and app on core {args.app_core}, proxies on core {args.proxy_core}; loads "
                f"{', '.join(load_label(*x) for x in args.h2_conns)} (clients x streams)",
                flush=True,
            )
            h2 = run_h2_matrix(
                harness,
                h2st,
                args.h2_conns,
                duration=args.duration,
                repeat=args.repeat,
                cell_warmup=args.cell_warmup,
                load_core=args.load_core,
                app_on_load_core=args.app_core == args.load_core,
            )
            h2["ratios"] = h2_ratios(h2["medians"], args.h2_conns, h2["failed"])
            result["h2"] = h2
            names = list(h2st.targets) + [t for t in http2 if t not in h2st.targets]
            print()
            print(
                f"gRPC unary calls (a {len(REPLY_MESSAGE)}-byte framed message each way) and HTTP/2 GETs "
                f"of the {len(b'hello, world') + 1}-byte /small, h2load, medians of {args.repeat} run(s); "
                "mean from h2load's summary, p50/p99/max from its per-request log:"
            )
            print(h2_table(h2["medians"], names, args.h2_conns, h2["failed"]))
            print()
            print("HTTP/2 ratios (same run; CPU = proxy us/call of all the row's proxy processes):")
            print(h2_ratio_table(h2["ratios"]))
        if args.profile:
            print()
            result["profile"] = run_profile(harness, stack, args)
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["elapsed_s"] = round(time.monotonic() - started)
        print(f"\ndone in {result['elapsed_s']} s", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        harness.close()
        if args.keep_workdir:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
