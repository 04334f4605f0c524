"""The pure parts of bench/'s HTTP/2 and gRPC rows (no processes): the framed gRPC message,
h2load's command line and its output read into numbers, nginx's grpc_pass server, the
ratios against nginx and the tables. bench/h2stack.py runs them.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

from report import _ratio, _x, fmt, table

GRPC_TARGETS = ["grpc-direct", "grpc-nginx", "grpc-sidecar", "grpc-mesh", "grpc-mesh-mtls"]
PLAIN_H2_TARGETS = ["h2-sidecar", "h2-nginx"]
H2_TARGETS = GRPC_TARGETS + PLAIN_H2_TARGETS

UNARY_PATH = "/bench.Echo/Unary"
REQUEST_PAYLOAD = b"\x0a\x05world"  # a protobuf message: field 1, the string "world"
REPLY_PAYLOAD = b"\x0a\x05hello"  # what the backends answer (bench/grpc_backend.py, .js)
GRPC_HEADERS = ["content-type: application/grpc", "te: trailers"]
GRPC_CPU_TARGET = 8.0  # the issue: gRPC unary CPU per call through one sidecar <= 8x nginx grpc_pass


def framed(payload: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: a compressed flag byte, the length (4 bytes, big
    endian), the bytes."""
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(payload)) + payload


def write_message(path: Path, payload: bytes = REQUEST_PAYLOAD) -> Path:
    """The request body h2load posts (`-d`) on every call: one framed message."""
    path.write_bytes(framed(payload))
    return path


def parse_load(text: str) -> list[tuple[int, int]]:
    """`--h2-conns` "16x1,16x16" -> [(16, 1), (16, 16)]: h2load clients x streams per client."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        clients, sep, streams = item.partition("x")
        if not clients.isdigit() or (sep and not streams.isdigit()):
            raise ValueError(f"{item!r} is not CLIENTSxSTREAMS (e.g. 16x1)")
        pair = (int(clients), int(streams) if sep else 1)
        if min(pair) < 1:
            raise ValueError(f"{item!r}: clients and streams must be at least 1")
        out.append(pair)
    if not out:
        raise ValueError("no CLIENTSxSTREAMS given")
    return out


def load_label(clients: int, streams: int) -> str:
    return f"{clients}x{streams}"


# --- h2load ------------------------------------------------------------------------------


def h2load_argv(
    url: str,
    clients: int,
    streams: int,
    *,
    duration: int | None = None,
    requests: int | None = None,
    data: Path | None = None,
    headers: list[str] | tuple[str, ...] = (),
    authority: str | None = None,
    log_file: Path | None = None,
) -> list[str]:
    """h2load over h2c with prior knowledge (an http:// URL), one thread: for `duration`
    seconds (-D) or `requests` requests (-n). `data`: POST that file on every request (-d);
    `authority`: the :authority to send instead of the URL's host:port (`-H ':authority: X'`
    overrides it; h2load 1.52's `-H 'host: X'` does not, over h2c); `log_file`: one line per
    request (start, status, microseconds), from which the percentiles are taken."""
    if (duration is None) == (requests is None):
        raise ValueError("give duration or requests")
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}"]
    argv += [f"-D{duration}"] if duration is not None else [f"-n{requests}"]
    if data is not None:
        argv += ["-d", str(data)]
    for header in headers:
        argv += ["-H", header]
    if authority:
        argv += ["-H", f":authority: {authority}"]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    argv.append(url)
    return argv


_UNITS_US = {"us": 1.0, "ms": 1000.0, "s": 1e6}
_DURATION = r"([\d.]+)(us|ms|s)"
_FINISHED_RE = re.compile(rf"^finished in {_DURATION}, ([\d.]+) req/s", re.MULTILINE)
_REQUESTS_RE = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
_STATUS_RE = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_TRAFFIC_RE = re.compile(
    r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?, .*?\((\d+)\) data", re.MULTILINE
)
_REQUEST_TIME_RE = re.compile(
    rf"^time for request:\s+{_DURATION}\s+{_DURATION}\s+{_DURATION}\s+{_DURATION}", re.MULTILINE
)


def _us(number: str, unit: str) -> float:
    return float(number) * _UNITS_US[unit]


def parse_h2load(text: str) -> dict[str, Any]:
    """h2load's summary as numbers: requests by outcome, status classes, bytes, and the
    request time it reports (min, max, mean, sd; it prints no percentiles), in microseconds.
    Raises ValueError when the summary is not there (h2load failed before the end)."""
    finished, requests = _FINISHED_RE.search(text), _REQUESTS_RE.search(text)
    if not finished or not requests:
        raise ValueError(f"no h2load summary in:\n{text[-2000:]}")
    total, started, done, succeeded, failed, errored, timeout = (int(g) for g in requests.groups())
    out: dict[str, Any] = {
        "duration_s": _us(finished.group(1), finished.group(2)) / 1e6,
        "h2load_rps": float(finished.group(3)),
        "total": total,
        "started": started,
        "done": done,
        "succeeded": succeeded,
        "failed": failed,
        "errored": errored,
        "timeout": timeout,
    }
    status = _STATUS_RE.search(text)
    s2, s3, s4, s5 = (int(g) for g in status.groups()) if status else (0, 0, 0, 0)
    out.update(status_2xx=s2, status_3xx=s3, status_4xx=s4, status_5xx=s5)
    traffic = _TRAFFIC_RE.search(text)
    t_total, t_headers, t_data = (int(g) for g in traffic.groups()) if traffic else (0, 0, 0)
    out.update(bytes_total=t_total, bytes_headers=t_headers, bytes_data=t_data)
    times = _REQUEST_TIME_RE.search(text)
    if times:
        g = times.groups()
        out.update(
            min_us=_us(g[0], g[1]), max_us=_us(g[2], g[3]), mean_us=_us(g[4], g[5]), sd_us=_us(g[6], g[7])
        )
    else:  # no request finished
        out.update(min_us=None, max_us=None, mean_us=None, sd_us=None)
    return out


def percentile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def parse_h2load_log(text: str) -> dict[str, Any]:
    """h2load's --log-file (tab-separated: start time in us since the epoch, HTTP status or
    -1 for a failed stream, us until the end of the response): p50, p99 and max of the
    requests that got an answer, and the count of each status."""
    latencies: list[int] = []
    statuses: dict[int, int] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[2].strip().isdigit():
            continue
        status = int(parts[1])
        statuses[status] = statuses.get(status, 0) + 1
        if status > 0:
            latencies.append(int(parts[2]))
    latencies.sort()
    return {
        "logged": sum(statuses.values()),
        "statuses": statuses,
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "max_us": latencies[-1] if latencies else None,
    }


def unanswered(summary: dict[str, Any], reply_len: int) -> int:
    """Requests that got no reply body of the expected size: h2load counts a 2xx as a success,
    but a failed gRPC call is an HTTP 200 with its grpc-status in the trailers and no message
    (trailers-only), so DATA bytes / the reply's size counts the calls that were answered."""
    answered = summary["bytes_data"] // reply_len if reply_len else summary["done"]
    return max(0, summary["done"] - answered)


# --- nginx -------------------------------------------------------------------------------

# grpc-nginx: nginx terminates HTTP/2 from h2load and passes each call on with grpc_pass
# over a keep-alive pool (nginx does not multiplex upstream: one call in flight per
# upstream connection), the same forwarding headers as the HTTP/1.1 reference proxy.
_GRPC_PROXY_SERVER = """\
  upstream grpc_backend {{
    server 127.0.0.1:{backend_port};
    keepalive 1024;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen 127.0.0.1:{port} http2 backlog=1024;
    http2_max_concurrent_streams 1000;
    location / {{
      grpc_pass grpc://grpc_backend;
      grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      grpc_set_header X-Forwarded-Proto $scheme;
      grpc_set_header X-Request-Id $request_id;
      grpc_read_timeout 30s;
      grpc_send_timeout 30s;
    }}
  }}
"""


def grpc_proxy_server(port: int, backend_port: int) -> str:
    """The `server` part of grpc-nginx's nginx.conf (nginx 1.22: `http2` on `listen`)."""
    return _GRPC_PROXY_SERVER.format(port=port, backend_port=backend_port)


# --- ratios and tables -------------------------------------------------------------------


FAILED_SHARE = 0.01  # a cell with more failed calls than this reports no rate


def cell_failure(m: dict[str, Any]) -> str | None:
    """Why a cell's numbers are not to be read as a rate: more than FAILED_SHARE of its calls
    failed (an error status, a reset stream, or no reply message), or none was made."""
    calls, errors = m.get("requests") or 0, m.get("errors") or 0
    if not calls:
        return "no call completed"
    if errors > FAILED_SHARE * calls:
        return f"{errors:,.0f} of {calls:,.0f} calls failed"
    return None


def h2_table(
    med: dict[str, dict[str, Any]], targets: list[str], loads: list[tuple[int, int]], failed: dict[str, str]
) -> str:
    """One row per load and target. A cell whose calls failed, or of a target that failed
    before it (`failed`: why), shows FAILED instead of a rate or per-call numbers; a clean
    cell of a target that failed later is marked *; the reasons go under the table."""
    headers = [
        "load/target",
        "calls/s",
        "mean ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "proxy us/call",
        "app us/call",
        "errors",
        "reply B",
        "load core %",
        "proxy cpu %",
        "others %",
    ]
    rows, notes = [], []
    for t in targets:
        if t in failed:
            notes.append(f"FAILED {t}: {failed[t]}")
    later = False
    for clients, streams in loads:
        label = load_label(clients, streams)
        for t in targets:
            m = med.get(f"h2/{t}/{label}")
            # a target that failed after this cell: the cell's own calls all succeeded
            mark = "*" if t in failed and m and not cell_failure(m) else ""
            later = later or bool(mark)
            name = f"{label:>5} {t}{mark}"
            if not m:
                if t in failed:
                    rows.append([name, "FAILED", *["-"] * (len(headers) - 2)])
                continue
            why = cell_failure(m)
            if why and not failed.get(t, "").startswith(f"h2/{t}/{label}:"):  # not said twice
                notes.append(f"FAILED {label} {t}: {why}")

            def per_call(value: Any, digits: int = 1, why: str | None = why) -> str:
                return "-" if why else fmt(value, digits)

            rows.append(
                [
                    name,
                    "FAILED" if why else fmt(m["rps"]),
                    per_call(m["mean_ms"], 2),
                    per_call(m["p50_ms"], 2),
                    per_call(m["p99_ms"], 2),
                    per_call(m["max_ms"], 1),
                    per_call(m["cpu_us"]),
                    per_call(m["app_cpu_us"]),
                    fmt(m["errors"], 0),
                    fmt(m["reply_bytes"], 1),
                    fmt(m["load_core_pct"], 0),
                    fmt(m["proxy_core_pct"], 0),
                    fmt(m["others_pct"], 0),
                ]
            )
    if later:
        notes.append("* the target FAILED after this cell; the cell's own calls were all answered")
    return "\n".join([table(headers, rows), *notes])


# (column, numerator target, denominator target)
RATIOS = [
    ("grpc-sidecar/nginx", "grpc-sidecar", "grpc-nginx"),
    ("grpc-mesh/nginx", "grpc-mesh", "grpc-nginx"),
    ("mesh-mtls/mesh", "grpc-mesh-mtls", "grpc-mesh"),
    ("mesh-mtls/nginx", "grpc-mesh-mtls", "grpc-nginx"),
    ("h2-sidecar/nginx", "h2-sidecar", "h2-nginx"),
]
METRICS = [("CPU us/call", "cpu_us"), ("calls/s", "rps"), ("p99 ms", "p99_ms")]


def h2_ratios(
    med: dict[str, dict[str, Any]], loads: list[tuple[int, int]], failed: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per load and metric: each ratio of RATIOS from the same run (None where a
    side was not measured or its cell's calls failed), and the issue's verdict on gRPC CPU
    per call through one sidecar against nginx grpc_pass (at most GRPC_CPU_TARGET x): FAIL
    whenever grpc-sidecar's calls failed, in that cell or later, whatever the ratio."""
    out = []
    for clients, streams in loads:
        label = load_label(clients, streams)
        for metric, key in METRICS:

            def value(target: str, key: str = key, label: str = label) -> float | None:
                cell = med.get(f"h2/{target}/{label}", {})
                if not cell or cell_failure(cell):  # a clean cell of a target that failed later counts
                    return None
                v = cell.get(key)
                return float(v) if isinstance(v, int | float) else None

            row: dict[str, Any] = {
                "load": label,
                "metric": metric,
                "ratios": {col: _ratio(value(a), value(b)) for col, a, b in RATIOS},
                "target": None,
                "verdict": None,
            }
            if key == "cpu_us":
                ratio = row["ratios"]["grpc-sidecar/nginx"]
                row["target"] = f"grpc-sidecar <= {GRPC_CPU_TARGET:g}x"
                sidecar_cell = med.get(f"h2/grpc-sidecar/{label}", {})
                if "grpc-sidecar" in failed or (sidecar_cell and cell_failure(sidecar_cell)):
                    row["verdict"] = "FAIL (calls failed)"
                elif ratio is None:
                    row["verdict"] = "n/a"
                else:
                    row["verdict"] = "PASS" if ratio <= GRPC_CPU_TARGET else "FAIL"
            out.append(row)
    return out


def h2_ratio_table(rows: list[dict[str, Any]]) -> str:
    headers = ["load", "metric", *[col for col, _, _ in RATIOS], "target"]
    body = [
        [
            r["load"],
            r["metric"],
            *[_x(r["ratios"][col]) for col, _, _ in RATIOS],
            f"{r['target']} {r['verdict']}" if r["target"] else "",
        ]
        for r in rows
    ]
    return table(headers, body)
