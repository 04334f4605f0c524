"""Medians, the tables, and the verdicts against issues 7 and 13's targets (pure: no processes)."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

MiB_KIB = 1024


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median over repeated runs of one cell (None where no run had a value)."""
    out: dict[str, Any] = {"runs": len(rows)}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        out[key] = statistics.median(values) if values else None
    return out


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def small_table(med: dict[str, dict[str, Any]], targets: list[str], conns: list[int]) -> str:
    headers = [
        "conns/target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "proxy us/req",
        "app us/req",
        "errors",
        "timeouts",
        "load core %",
        "proxy cpu %",
        "others %",
    ]
    rows = []
    for c in conns:
        for t in targets:
            m = med.get(f"small/{t}/{c}")
            if not m:
                continue
            rows.append(
                [
                    f"{c:>4} {t}",
                    fmt(m["rps"]),
                    fmt(m["p50_ms"], 3),
                    fmt(m["p99_ms"], 2),
                    fmt(m["max_ms"], 1),
                    fmt(m["cpu_us"]),
                    fmt(m["app_cpu_us"]),
                    fmt(m["errors"], 0),
                    fmt(m["timeouts"], 0),
                    fmt(m["load_core_pct"], 0),
                    fmt(m["proxy_core_pct"], 0),
                    fmt(m["others_pct"], 0),
                ]
            )
    return table(headers, rows)


def transfer_table(med: dict[str, dict[str, Any]], rss: dict[str, dict[str, Any]], targets: list[str]) -> str:
    headers = [
        "target",
        "down MiB/s",
        "up MiB/s",
        "down proxy cpu %",
        "up proxy cpu %",
        "RSS idle MiB",
        "RSS 1000 ka MiB",
        "ka failed",
        "RSS after MiB",
    ]
    rows = []
    for t in targets:
        d = med.get(f"download/{t}/1", {})
        u = med.get(f"upload/{t}/1", {})
        r = rss.get(t, {})
        rows.append(
            [
                t,
                fmt(d.get("mib_s"), 0),
                fmt(u.get("mib_s"), 0),
                fmt(d.get("proxy_core_pct"), 0),
                fmt(u.get("proxy_core_pct"), 0),
                fmt(_mib(r.get("idle_kib"))),
                fmt(_mib(r.get("keepalive_kib"))),
                fmt(r.get("keepalive_failed"), 0),
                fmt(_mib(r.get("after_kib"))),
            ]
        )
    return table(headers, rows)


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / MiB_KIB


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def verdicts(med: dict[str, dict[str, Any]], rss: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 7's targets: one row each, judged on the one-hop sidecar; the mesh path for information."""

    def cell(target: str, kind: str, conns: int, key: str) -> Any:
        return med.get(f"{kind}/{target}/{conns}", {}).get(key)

    def added_p50(target: str) -> float | None:
        p, d = cell(target, "small", 1, "p50_ms"), cell("direct", "small", 1, "p50_ms")
        return None if p is None or d is None else (p - d) * 1000.0

    specs: list[tuple[str, Any, str, Any]] = [
        ("CPU us/request, 16 conns", lambda t: cell(t, "small", 16, "cpu_us"), "<= 4x", lambda r, v: r <= 4),
        ("req/s, 16 conns", lambda t: cell(t, "small", 16, "rps"), ">= 0.25x", lambda r, v: r >= 0.25),
        ("req/s, 64 conns", lambda t: cell(t, "small", 64, "rps"), ">= 0.25x", lambda r, v: r >= 0.25),
        (
            "p99 ms, 1000 conns",
            lambda t: cell(t, "small", 1000, "p99_ms"),
            "<= 3x, none starved",
            lambda r, v: r <= 3,
        ),
        ("added p50 us over direct, 1 conn", added_p50, "<= 1.5x", lambda r, v: r <= 1.5),
        (
            "10 MiB download MiB/s",
            lambda t: cell(t, "download", 1, "mib_s"),
            ">= 0.9x",
            lambda r, v: r >= 0.9,
        ),
        ("10 MiB upload MiB/s", lambda t: cell(t, "upload", 1, "mib_s"), ">= 0.9x", lambda r, v: r >= 0.9),
        ("RSS idle MiB", lambda t: _mib(rss.get(t, {}).get("idle_kib")), "<= 50 MiB", lambda r, v: v <= 50),
        (
            "RSS 1000 keep-alive MiB",
            lambda t: _mib(rss.get(t, {}).get("keepalive_kib")),
            "<= 80 MiB",
            lambda r, v: v <= 80,
        ),
    ]
    out = []
    for metric, value, target_text, ok in specs:
        n, s, m = value("nginx"), value("sidecar"), value("mesh")
        ratio = _ratio(s, n)
        row: dict[str, Any] = {
            "metric": metric,
            "nginx": n,
            "sidecar": s,
            "sidecar_ratio": ratio,
            "mesh": m,
            "mesh_ratio": _ratio(m, n),
            "target": target_text,
        }
        absolute = target_text.endswith("MiB")
        if s is None or (ratio is None and not absolute):
            verdict = "n/a"
        else:
            verdict = "PASS" if ok(ratio, s) else "FAIL"
        if metric.startswith("p99") and s is not None:
            starved = (cell("sidecar", "small", 1000, "timeouts") or 0) + (
                cell("sidecar", "small", 1000, "errors") or 0
            )
            if starved:
                verdict = f"FAIL ({starved:.0f} timeouts/errors)"
        row["verdict"] = verdict
        out.append(row)
    return out


def scaling_table(med: dict[str, dict[str, Any]], conns: list[int], workers: int) -> str:
    """The `workers` target against the one-process sidecar, per connection count."""
    headers = [
        "conns",
        "1 process req/s",
        f"{workers} workers req/s",
        "speed-up",
        "1 process us/req",
        f"{workers} workers us/req",
        f"{workers} workers cpu %",
    ]
    body = []
    for c in conns:
        one, many = med.get(f"small/sidecar/{c}", {}), med.get(f"small/workers/{c}", {})
        body.append(
            [
                str(c),
                fmt(one.get("rps")),
                fmt(many.get("rps")),
                fmt(_ratio(many.get("rps"), one.get("rps")), 2) + "x",
                fmt(one.get("cpu_us")),
                fmt(many.get("cpu_us")),
                fmt(many.get("proxy_core_pct"), 0),
            ]
        )
    return table(headers, body)


MTLS_CPU_TARGET = 1.25  # issue 13: mesh-mtls / mesh CPU per request at 16 connections
MTLS_TARGET_CONNS = 16


def mtls_ratios(med: dict[str, dict[str, Any]], conns: list[int]) -> list[dict[str, Any]]:
    """Issue 13's CPU per request of the two-hop rows, one row per connection count: what mTLS
    costs the mesh (mesh-mtls / mesh, judged at 16 connections), against nginx doing the same
    two hops over TLS (mesh-mtls / nginx-tls), and, as gauges, what TLS costs nginx
    (nginx-tls / nginx-2hop) and the plaintext mesh against plaintext nginx (mesh / nginx-2hop)."""
    out = []
    for c in conns:
        mesh, mtls, plain, tls = (
            med.get(f"small/{t}/{c}", {}).get("cpu_us")
            for t in ("mesh", "mesh-mtls", "nginx-2hop", "nginx-tls")
        )
        ratio = _ratio(mtls, mesh)
        row: dict[str, Any] = {
            "conns": c,
            "mesh_us": mesh,
            "mesh_mtls_us": mtls,
            "nginx_2hop_us": plain,
            "nginx_tls_us": tls,
            "mesh_mtls_over_mesh": ratio,
            "mesh_mtls_over_nginx_tls": _ratio(mtls, tls),
            "nginx_tls_over_nginx_2hop": _ratio(tls, plain),
            "mesh_over_nginx_2hop": _ratio(mesh, plain),
            "target": None,
            "verdict": None,
        }
        if c == MTLS_TARGET_CONNS:
            row["target"] = f"<= {MTLS_CPU_TARGET}x"
            row["verdict"] = "n/a" if ratio is None else ("PASS" if ratio <= MTLS_CPU_TARGET else "FAIL")
        out.append(row)
    return out


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def mtls_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "conns",
        "mesh",
        "mesh-mtls",
        "mtls/mesh",
        "target",
        "nginx-2hop",
        "nginx-tls",
        "mtls/nginx-tls",
        "nginx tls/2hop",
        "mesh/nginx-2hop",
    ]
    body = [
        [
            str(r["conns"]),
            fmt(r["mesh_us"]),
            fmt(r["mesh_mtls_us"]),
            _x(r["mesh_mtls_over_mesh"]),
            f"{r['target']} {r['verdict']}" if r["target"] else "",
            fmt(r["nginx_2hop_us"]),
            fmt(r["nginx_tls_us"]),
            _x(r["mesh_mtls_over_nginx_tls"]),
            _x(r["nginx_tls_over_nginx_2hop"]),
            _x(r["mesh_over_nginx_2hop"]),
        ]
        for r in rows
    ]
    return table(headers, body)


HANDSHAKE_TARGET = 0.3  # issue 13: new mTLS connections/s of the sidecar, at least 0.3x nginx's


def handshake_summary(med: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sidecar B's inbound port (mesh-mtls) against nginx's back (nginx-tls): the rate of new
    mutual-TLS connections, judged against issue 13's target, and the CPU per connection,
    whose inverse is the rate one core could take whatever limited this run."""
    s, n = med.get("mesh-mtls", {}), med.get("nginx-tls", {})
    ratio = _ratio(s.get("per_s"), n.get("per_s"))
    return {
        "sidecar_per_s": s.get("per_s"),
        "nginx_per_s": n.get("per_s"),
        "ratio": ratio,
        "target": f">= {HANDSHAKE_TARGET}x",
        "verdict": "n/a" if ratio is None else ("PASS" if ratio >= HANDSHAKE_TARGET else "FAIL"),
        "sidecar_cpu_us": s.get("cpu_us"),
        "nginx_cpu_us": n.get("cpu_us"),
        # connections/s at one full core each: nginx's CPU per connection over the sidecar's
        "cpu_bound_ratio": _ratio(n.get("cpu_us"), s.get("cpu_us")),
    }


def handshake_table(med: dict[str, dict[str, Any]], probes: dict[str, dict[str, Any]]) -> str:
    headers = [
        "target",
        "server",
        "tls",
        "conn/s",
        "proxy us/conn",
        "conn/s at 1 core",
        "proxy cpu %",
        "load core %",
        "others %",
    ]
    body = []
    for name, m in med.items():
        seen = probes.get(name, {})
        cpu_us = m.get("cpu_us")
        body.append(
            [
                name,
                str(seen.get("server", "")),
                f"{seen.get('tls')} {seen.get('cipher')}",
                fmt(m.get("per_s")),
                fmt(cpu_us),
                fmt(1e6 / cpu_us if cpu_us else None),
                fmt(m.get("proxy_core_pct"), 0),
                fmt(m.get("load_core_pct"), 0),
                fmt(m.get("others_pct"), 0),
            ]
        )
    return table(headers, body)


def verdict_table(rows: list[dict[str, Any]]) -> str:
    headers = ["issue 7 metric", "nginx", "sidecar", "ratio", "mesh", "ratio", "target", "sidecar"]
    body = [
        [
            r["metric"],
            fmt(r["nginx"]),
            fmt(r["sidecar"]),
            fmt(r["sidecar_ratio"], 2) + ("x" if r["sidecar_ratio"] is not None else ""),
            fmt(r["mesh"]),
            fmt(r["mesh_ratio"], 2) + ("x" if r["mesh_ratio"] is not None else ""),
            r["target"],
            r["verdict"],
        ]
        for r in rows
    ]
    return table(headers, body)


# --- py-spy raw stacks ---------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    return Path(path).name if path.startswith("/") else path


def _frame_key(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m["func"], _short(m["file"])


def profile_summary(raw: str, top: int = 20) -> dict[str, Any]:
    """Own ('self') and inclusive sample counts per function, and own time per file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = other_threads = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if stack.startswith("Thread._bootstrap"):
            # Not the event loop: the registry's executor threads, which py-spy often
            # counts as busy while they wait on their queue. Reported apart.
            other_threads += count
            continue
        total += count
        frames = [_frame_key(f) for f in stack.split(";")]
        func, file = frames[-1]
        own[f"{func} ({file})"] += count
        files[file] += count
        for key in {f"{fn} ({fl})" for fn, fl in frames}:
            incl[key] += count

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "other_thread_samples": other_threads,
        "own": pct(own),
        "inclusive": pct(incl),
        "own_by_file": pct(files),
    }


def profile_text(summary: dict[str, Any], top: int = 15) -> str:
    lines = [
        f"py-spy: {summary['samples']} samples of the event-loop thread "
        f"({summary['other_thread_samples']} of other threads left out); top functions by own time:"
    ]
    lines += [f"  {p:5.1f}%  {k}" for k, p in summary["own"][:top]]
    lines.append("own time by file:")
    lines += [f"  {p:5.1f}%  {k}" for k, p in summary["own_by_file"][:10]]
    return "\n".join(lines)
