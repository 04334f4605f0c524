"""The pure parts of bench/'s gRPC and HTTP/2 rows: h2load's output read into numbers (from
captured runs), the framed message h2load posts, nginx's grpc_pass and HTTP/2 servers, the
ratios and the tables, and the HTTP/2 library microbenchmark's exchange.

No benchmark runs here: CI times nothing. bench/ modules import each other by bare name, as
bench/run.py runs them, so bench/ goes on the path.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import h2lib
from h2report import (
    GRPC_HEADERS,
    REPLY_PAYLOAD,
    cell_failure,
    framed,
    grpc_proxy_server,
    h2_ratio_table,
    h2_ratios,
    h2_table,
    h2load_argv,
    parse_h2load,
    parse_h2load_log,
    parse_load,
    percentile,
    unanswered,
    write_message,
)
from stack import _proxy_server

# h2load -c4 -m2 -D 2 -d msg -H 'content-type: application/grpc' -H 'te: trailers' against
# the Node backend: 12 DATA bytes per call (one framed 7-byte message).
GRPC_OK = """\
starting benchmark...
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 2.00s, 17695.00 req/s, 795.43KB/s
requests: 35390 total, 35398 started, 35390 done, 35390 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 35396 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.55MB (1629042) total, 173.36KB (177524) headers (space savings 96.39%), 414.80KB (424752) data
                     min         max         mean         sd        +/- sd
time for request:       94us     12.93ms       438us       569us    95.60%
time for connect:       42us        68us        57us        11us    75.00%
time to 1st byte:     1.57ms      6.98ms      4.18ms      2.50ms    50.00%
req/s           :    4419.78     4426.76     4423.53        2.86    50.00%
"""

# The same against a method the backend does not have: every call an HTTP 200 that h2load
# counts as a success, grpc-status UNIMPLEMENTED in a trailers-only answer, no DATA.
GRPC_UNIMPLEMENTED = """\
finished in 11.05ms, 9053.87 req/s, 169.05KB/s
requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.87KB (1912) total, 916B (916) headers (space savings 94.24%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:      110us      3.39ms       729us       885us    84.00%
time for connect:       75us       230us       139us        65us    75.00%
time to 1st byte:     1.38ms      2.85ms      2.12ms       658us    50.00%
req/s           :    2299.57     3136.12     2700.85      455.94   100.00%
"""

# Half the GETs answered 503 by nginx: h2load's "failed" holds the non-2xx answers.
HALF_503 = """\
finished in 1.57ms, 63653.72 req/s, 4.70MB/s
requests: 100 total, 100 started, 100 done, 50 succeeded, 50 failed, 0 errored, 0 timeout
status codes: 50 2xx, 0 3xx, 0 4xx, 50 5xx
traffic: 7.57KB (7748) total, 4.93KB (5050) headers (space savings 48.73%), 800B (800) data
                     min         max         mean         sd        +/- sd
time for request:       13us       313us        34us        55us    96.00%
"""

# A proxy that took the connections and never answered.
NOTHING_ANSWERED = """\
finished in 2.00s, 0.00 req/s, 488B/s
requests: 0 total, 16 started, 0 done, 0 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 976B (976) total, 0B (0) headers (space savings 0.00%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:        0us         0us         0us         0us     0.00%
"""

# Whole seconds in the request time (nginx grpc_pass at 16x16, one slow call).
SECONDS = """\
finished in 2.00s, 7827.50 req/s, 1.29MB/s
requests: 15655 total, 15911 started, 15655 done, 15655 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 15809 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 2.57MB (2698733) total, 1.60MB (1675754) headers (space savings 32.48%), 185.26KB (189708) data
time for request:     3.26ms       1.25s     32.33ms     66.24ms    99.00%
"""


def test_h2load_summary_as_numbers():
    s = parse_h2load(GRPC_OK)
    assert s["duration_s"] == 2.0
    assert s["done"] == 35390 and s["succeeded"] == 35390 and s["started"] == 35398
    assert s["status_2xx"] == 35396  # counted at the headers: more than done
    assert (s["bytes_total"], s["bytes_headers"], s["bytes_data"]) == (1629042, 177524, 424752)
    assert (s["min_us"], s["max_us"], s["mean_us"], s["sd_us"]) == (94.0, 12930.0, 438.0, 569.0)
    assert unanswered(s, len(framed(REPLY_PAYLOAD))) == 0


def test_h2load_durations_in_ms_and_whole_seconds():
    assert parse_h2load(GRPC_UNIMPLEMENTED)["duration_s"] == pytest.approx(0.01105)
    s = parse_h2load(SECONDS)
    assert s["max_us"] == 1.25e6 and s["mean_us"] == pytest.approx(32330.0)


def test_grpc_errors_are_http_200_without_a_message():
    s = parse_h2load(GRPC_UNIMPLEMENTED)
    assert s["succeeded"] == 100 and s["failed"] == 0  # what h2load alone would report
    assert unanswered(s, 12) == 100


def test_non_2xx_answers_are_failed_in_h2load():
    s = parse_h2load(HALF_503)
    assert (s["succeeded"], s["failed"], s["status_5xx"]) == (50, 50, 50)


def test_nothing_answered_and_no_summary():
    s = parse_h2load(NOTHING_ANSWERED)
    assert s["done"] == 0 and s["started"] == 16
    with pytest.raises(ValueError):
        parse_h2load("starting benchmark...\nconnect to 127.0.0.1 failed\n")


def test_percentiles_from_the_request_log():
    lines = [f"1796235898253221\t200\t{us}" for us in range(1, 101)]
    lines += ["1796235898253221\t503\t5000", "1796235898253221\t-1\t9", "garbage", ""]
    lat = parse_h2load_log("\n".join(lines))
    assert lat["logged"] == 102
    assert lat["statuses"] == {200: 100, 503: 1, -1: 1}
    assert lat["p50_us"] == 51 and lat["p99_us"] == 100 and lat["max_us"] == 5000
    assert percentile([], 99) is None
    assert percentile([7], 50) == 7


def test_framed_message_file(tmp_path):
    path = write_message(tmp_path / "unary.msg", b"\x0a\x05world")
    data = path.read_bytes()
    assert data[0] == 0  # not compressed
    assert struct.unpack(">I", data[1:5])[0] == 7
    assert data[5:] == b"\x0a\x05world"
    assert framed(b"", compressed=True) == b"\x01\x00\x00\x00\x00"
    assert len(framed(REPLY_PAYLOAD)) == 12


def test_h2load_argv_posts_the_message_with_grpc_headers(tmp_path):
    argv = h2load_argv(
        "http://127.0.0.1:9/bench.Echo/Unary",
        16,
        16,
        duration=8,
        data=tmp_path / "m",
        headers=GRPC_HEADERS,
        authority="echo",
        log_file=tmp_path / "log",
    )
    assert argv[:5] == ["h2load", "-t1", "-c16", "-m16", "-D8"]
    assert argv[argv.index("-d") + 1] == str(tmp_path / "m")
    headers = [argv[i + 1] for i, a in enumerate(argv) if a == "-H"]
    assert headers == ["content-type: application/grpc", "te: trailers", ":authority: echo"]
    assert argv[-1] == "http://127.0.0.1:9/bench.Echo/Unary"
    assert "-n20" in h2load_argv("http://x/", 1, 1, requests=20)
    with pytest.raises(ValueError):
        h2load_argv("http://x/", 1, 1)


def test_loads_from_the_command_line():
    assert parse_load("16x1,16x16") == [(16, 1), (16, 16)]
    assert parse_load(" 4 , 2x8") == [(4, 1), (2, 8)]
    for bad in ("", "16x", "ax1", "0x1", "16x0"):
        with pytest.raises(ValueError):
            parse_load(bad)


def test_nginx_grpc_pass_server():
    conf = grpc_proxy_server(8443, 50051)
    assert "listen 127.0.0.1:8443 http2 backlog=1024;" in conf
    assert "server 127.0.0.1:50051;" in conf
    assert "grpc_pass grpc://grpc_backend;" in conf
    assert "keepalive 1024;" in conf
    assert conf.count("{") == conf.count("}")


def test_nginx_http2_proxy_server():
    conf = _proxy_server(8080, 9090, http2=True)
    assert "listen 127.0.0.1:8080 http2 backlog=1024;" in conf
    assert "proxy_pass http://next_hop;" in conf and "proxy_http_version 1.1;" in conf
    assert "listen 127.0.0.1:8080 backlog=1024;" in _proxy_server(8080, 9090)
    assert "listen 127.0.0.1:8080 ssl backlog=1024;" in _proxy_server(8080, 9090, server_tls="x\n")


def _cell(rps: float, cpu: float | None, p99: float, requests: int = 1000, errors: int = 0) -> dict:
    return {
        "requests": requests,
        "rps": rps,
        "mean_ms": 1.0,
        "p50_ms": 1.0,
        "p99_ms": p99,
        "max_ms": 9.0,
        "cpu_us": cpu,
        "app_cpu_us": 30.0,
        "errors": errors,
        "reply_bytes": 12.0,
        "load_core_pct": 99.0,
        "proxy_core_pct": 90.0,
        "others_pct": 1.0,
    }


def test_ratios_and_the_issue_verdict():
    med = {
        "h2/grpc-nginx/16x1": _cell(8000, 40.0, 4.0),
        "h2/grpc-sidecar/16x1": _cell(2000, 300.0, 12.0),
        "h2/grpc-mesh/16x1": _cell(1000, 700.0, 20.0),
        "h2/grpc-mesh-mtls/16x1": _cell(900, 840.0, 22.0),
        "h2/grpc-nginx/16x16": _cell(9000, 35.0, 30.0),
        "h2/grpc-sidecar/16x16": _cell(3000, 350.0, 80.0),
    }
    rows = h2_ratios(med, [(16, 1), (16, 16)], {})
    cpu1, rps1 = rows[0], rows[1]
    assert cpu1["metric"] == "CPU us/call" and cpu1["load"] == "16x1"
    assert cpu1["ratios"]["grpc-sidecar/nginx"] == 7.5
    assert cpu1["ratios"]["mesh-mtls/mesh"] == pytest.approx(1.2)
    assert cpu1["ratios"]["h2-sidecar/nginx"] is None  # not measured
    assert cpu1["verdict"] == "PASS"
    assert rps1["ratios"]["grpc-sidecar/nginx"] == 0.25 and rps1["verdict"] is None
    assert rows[3]["ratios"]["grpc-sidecar/nginx"] == 10.0 and rows[3]["verdict"] == "FAIL"
    assert "grpc-sidecar <= 8x PASS" in h2_ratio_table(rows)


def test_failed_rows_report_no_rate():
    med = {
        "h2/grpc-nginx/16x1": _cell(8000, 40.0, 4.0),
        "h2/grpc-sidecar/16x1": _cell(10, 300.0, 12.0, requests=100, errors=100),
        "h2/grpc-mesh/16x1": _cell(1000, 700.0, 20.0),
    }
    assert cell_failure(med["h2/grpc-sidecar/16x1"]) == "100 of 100 calls failed"
    assert cell_failure(_cell(1, 1.0, 1.0, requests=0)) == "no call completed"
    assert cell_failure(_cell(1000, 1.0, 1.0, requests=1000, errors=10)) is None  # 1 %: a rate
    failed = {"grpc-mesh": "check after the run: grpc-status UNAVAILABLE: GOAWAY"}
    rows = h2_ratios(med, [(16, 1)], failed)
    assert rows[0]["ratios"]["grpc-sidecar/nginx"] is None
    assert rows[0]["ratios"]["grpc-mesh/nginx"] == 17.5  # its cell was clean: it failed later
    assert rows[0]["verdict"] == "FAIL (calls failed)"
    assert h2_ratios(med, [(16, 16)], {"grpc-sidecar": "did not start"})[0]["verdict"] == (
        "FAIL (calls failed)"
    )
    text = h2_table(med, ["grpc-nginx", "grpc-sidecar", "grpc-mesh", "grpc-mesh-mtls"], [(16, 1)], failed)
    lines = text.splitlines()
    assert "8,000" in next(line for line in lines if "grpc-nginx" in line)
    sidecar = next(line for line in lines if line.startswith(" 16x1 grpc-sidecar "))
    assert sidecar.split()[2:8] == ["FAILED", "-", "-", "-", "-", "-"]  # no rate, no per-call numbers
    mesh = next(line for line in lines if line.startswith(" 16x1 grpc-mesh*"))
    assert mesh.split()[2] == "1,000"
    assert "FAILED 16x1 grpc-sidecar: 100 of 100 calls failed" in lines
    assert "FAILED grpc-mesh: check after the run: grpc-status UNAVAILABLE: GOAWAY" in lines
    assert any(line.startswith("* the target FAILED after this cell") for line in lines)
    failed["grpc-mesh-mtls"] = "did not start: sidecar-a-mtls exited 1"
    text = h2_table(med, ["grpc-mesh-mtls"], [(16, 1)], failed)
    assert text.splitlines()[2].split()[2] == "FAILED"


@pytest.mark.parametrize("name", ["h2", "jh2"])
def test_h2lib_exchange_is_a_whole_unary_call(name):
    lib = h2lib.Lib(name)
    client, server = lib.pair()
    for i in range(3):
        h2lib.exchange(lib, client, server, 2 * i + 1)  # raises when a side got the wrong thing
    assert h2lib.time_round(lib, 5) > 0
