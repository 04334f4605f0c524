"""Faults the sidecar survives, and its resource limits (issue 5).

Every process is started through the `procs` list (or a FaultProxy used as a context
manager), so everything is stopped even when a test fails. All traffic stays on loopback,
every load loop is bounded in count and in time.

Limits are shortened for the tests through MICRO_SIDECAR_* environment variables (click
reads them for flags of the same name and ignores the ones it does not know); LIMIT_ENV
names the ones these tests expect.
"""

from __future__ import annotations

import http.client as http_client
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy, RawApp, RawConn
from tests.helpers import http, wait_for

LIMIT_ENV = {
    "MICRO_SIDECAR_HEADER_TIMEOUT": "2",  # seconds for the request head (408 after)
    "MICRO_SIDECAR_IDLE_TIMEOUT": "2",  # seconds an idle client keep-alive connection stays open
    "MICRO_SIDECAR_BODY_TIMEOUT": "2",  # seconds without request-body bytes (408 / close after)
    "MICRO_SIDECAR_WRITE_TIMEOUT": "2",  # seconds a client may stop reading the response
    "MICRO_SIDECAR_MAX_CONNECTIONS": "100",  # client connections per listener
    "MICRO_SIDECAR_UPSTREAM_MAX_CONNECTIONS": "10",  # pool size per upstream
    "MICRO_SIDECAR_UPSTREAM_MAX_PENDING": "10",  # requests waiting for a pooled connection
}


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_app(procs, tmp_path: Path, *args: str, name: str = "raw", port: int | None = None) -> RawApp:
    app = RawApp(tmp_path / f"{name}-{len(procs)}.jsonl", *args, port=port)
    procs.append(app)
    return app.wait_up()


def corrupt(path: Path) -> None:
    """Break a live SQLite registry in place (as root, permissions would not stop the sidecar)."""
    for suffix in ("", "-wal", "-shm"):
        target = Path(str(path) + suffix)
        if target.exists():
            with open(target, "r+b") as f:
                f.write(b"this is not a database anymore" * 200)


def parallel(n: int, fn, timeout: float = 30.0) -> list:
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(fn, i) for i in range(n)]
        return [f.result(timeout=timeout) for f in futures]


def status_of(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 10.0) -> int:
    """The status, or -1 for a broken connection / truncated answer, -2 for a timeout."""
    try:
        return http(method, url, body=body, timeout=timeout)[0]
    except (OSError, http_client.HTTPException) as exc:
        return -2 if "timed out" in str(exc) else -1


# -- faults -------------------------------------------------------------------------------


def test_app_crash_and_restart(start_app, start_sidecar):
    app = start_app("crashy")
    sc = start_sidecar(app.port, "--name", "crashy")
    assert http("GET", f"{sc.inbound}/x")[0] == 200
    app.signal(signal.SIGKILL)
    app.wait(5)
    started = time.monotonic()
    codes = [status_of(f"{sc.inbound}/x", timeout=5) for _ in range(5)]
    assert set(codes) <= {502, 503}, codes
    assert time.monotonic() - started < 5, "answers for a dead app must be fast"
    start_app("crashy", port=app.port)
    wait_for(lambda: status_of(f"{sc.inbound}/x") == 200, 10, what="200 after the app restarted")
    assert sc.popen.poll() is None and "Traceback" not in sc.output()


def test_app_hangs_sigstop_gives_504_and_bounded_in_flight(start_app, start_sidecar):
    app = start_app("hung")
    sc = start_sidecar(app.port, "--name", "hung", "--request-timeout", "1", "--health-timeout", "0.5")
    assert http("GET", f"{sc.inbound}/x")[0] == 200
    baseline = fds(sc.pid)
    app.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        codes = parallel(50, lambda i: status_of(f"{sc.inbound}/x{i}", timeout=10))
        took = time.monotonic() - started
        assert set(codes) <= {503, 504}, codes
        assert 504 in codes, "requests that reached the hung app must time out with 504"
        assert took < 5, f"50 requests to a hung app took {took:.1f}s with a 1 s request timeout"
        wait_for(lambda: sc.status()["requests"]["inbound_active"] == 0, 5, what="no request in flight")
    finally:
        app.signal(signal.SIGCONT)
    wait_for(lambda: status_of(f"{sc.inbound}/x") == 200, 10, what="200 after SIGCONT")
    wait_for(lambda: fds(sc.pid) <= baseline + 4, 10, what=f"fds back near {baseline} (now {fds(sc.pid)})")


def test_local_registry_down_mid_run_keeps_serving_and_recovers(start_app, start_sidecar, registry_path):
    peer_app = start_app("peer")
    start_sidecar(peer_app.port, "--name", "peer")
    app = start_app("me")
    sc = start_sidecar(app.port, "--name", "me")
    assert http("GET", f"{sc.outbound}/peer/x")[0] == 200
    corrupt(registry_path)
    time.sleep(2)  # a few registration and discovery rounds against the broken registry
    assert sc.popen.poll() is None
    assert http("GET", f"{sc.inbound}/x")[0] == 200, "inbound must not depend on the registry"
    assert http("GET", f"{sc.outbound}/peer/x")[0] == 200, "known endpoints stay in use (fail static)"
    assert "Traceback" not in sc.output()
    # the registry comes back as a fresh file: the sidecar must find it and register again
    for suffix in ("", "-wal", "-shm"):
        Path(str(registry_path) + suffix).unlink(missing_ok=True)
    wait_for(
        lambda: any(r["name"] == "me" for r in _registry_rows(registry_path)),
        30,
        what="the sidecar registered again in the new registry file",
    )


def _registry_rows(path: Path) -> list[dict]:
    import sqlite3

    if not path.exists():
        return []
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return [{"name": r[0]} for r in db.execute("SELECT name FROM instances")]
    except sqlite3.Error:
        return []


def test_upstream_reset_get_retried_on_another_instance_post_not(start_sidecar, procs, tmp_path):
    """Instance A's address is a proxy that resets every connection after reading the request.
    Plaintext between the sidecars (--mtls off): over TLS the proxy would reset the handshake,
    before any request was sent, and a POST would then rightly be retried."""
    good_app = raw_app(procs, tmp_path, name="good")
    start_sidecar(good_app.port, "--name", "flaky", "--health-path", "", "--mtls", "off")
    bad_app = raw_app(procs, tmp_path, name="bad")
    # Its sidecar listens on 127.0.0.2, on a port the kernel picks, and advertises 127.0.0.3,
    # where the proxy listens on the same port (while the sidecar holds 127.0.0.2:port, no
    # wildcard bind can take it).
    bad = start_sidecar(
        bad_app.port,
        "--name",
        "flaky",
        "--health-path",
        "",
        "--inbound-host",
        "127.0.0.2",
        "--advertise-address",
        "127.0.0.3",
        "--mtls",
        "off",
    )
    port = bad.inbound_port
    with FaultProxy(port, "127.0.0.2", listen=("127.0.0.3", port)) as proxy:
        # round robin, no ejection: every other POST goes to the resetting instance
        caller = start_sidecar(
            raw_app(procs, tmp_path, name="caller").port,
            "--name",
            "caller",
            "--lb",
            "round_robin",
            "--outlier-failures",
            "1000",
            "--mtls",
            "off",
        )
        assert status_of(f"{caller.outbound}/flaky/warm") == 200
        wait_for(
            lambda: len(caller.status()["upstreams"].get("flaky", {}).get("instances", [])) == 2,
            10,
            what="two instances of flaky",
        )
        proxy.set("reset")
        gets = [status_of(f"{caller.outbound}/flaky/get{i}") for i in range(6)]
        assert gets == [200] * 6, f"GETs reset by one instance must be retried on the other: {gets}"
        before = len(good_app.seen())
        posts = [status_of(f"{caller.outbound}/flaky/post{i}", "POST", b"once") for i in range(6)]
        reached_good = [s for s in good_app.seen()[before:] if s["method"] == "POST"]
        assert 502 in posts, f"a POST to the resetting instance must get 502: {posts}"
        assert set(posts) <= {200, 502}, posts
        assert posts.count(200) == len(reached_good), "a POST was retried on the other instance"
        assert not [s for s in bad_app.seen() if s["method"] == "POST"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_keepalive_race_with_app_idle_timeout_shorter_than_pool(start_sidecar, procs, tmp_path, method):
    app = raw_app(procs, tmp_path, "--idle-timeout", "0.5", name="idle")
    sc = start_sidecar(app.port, "--name", "idle", "--health-path", "")
    failures = []
    deadline = time.monotonic() + 30
    for i in range(16):  # sweep the gap across the app's idle timeout
        if time.monotonic() > deadline:
            break
        code = status_of(f"{sc.inbound}/r{i}", method, b"body" if method == "POST" else None)
        if code != 200:
            failures.append((i, code))
        time.sleep(0.42 + (i % 8) * 0.02)
    assert not failures, f"{method} requests lost to the keep-alive race: {failures}"


def test_sigterm_with_requests_in_flight_while_registry_down(start_app, start_sidecar, registry_path):
    app = start_app("busy")
    sc = start_sidecar(app.port, "--name", "busy", "--drain-delay", "0.3", "--grace-period", "10")
    results: dict[int, tuple] = {}

    def call(i: int) -> None:
        try:
            results[i] = http("GET", f"{sc.inbound}/slow?s=2", timeout=15)[::2]
        except OSError as exc:
            results[i] = (-1, str(exc).encode())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.4)
    corrupt(registry_path)
    sc.signal(signal.SIGTERM)
    started = time.monotonic()
    code = sc.wait(20)
    for t in threads:
        t.join(15)
    assert code == 0, sc.output()[-2000:]
    assert time.monotonic() - started < 15
    assert all(r == (200, b"slow done\n") for r in results.values()) and len(results) == 5, results
    assert "Traceback" not in sc.output()


# -- resource limits --------------------------------------------------------------------


@pytest.fixture
def limited(start_app, start_sidecar):
    app = start_app("lim")
    return start_sidecar(app.port, "--name", "lim", "--request-timeout", "30", env=LIMIT_ENV)


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
def test_header_timeout_408_and_close(limited, listener):
    port = limited.inbound_port if listener == "inbound" else limited.outbound_port
    with RawConn(port, timeout=10) as conn:
        conn.send(b"GET /x HTTP/1.1\r\nHost: lim\r\n")  # the head never ends
        started = time.monotonic()
        try:
            resp = conn.read_response(timeout=8)
        except TimeoutError:
            resp = None
        took = time.monotonic() - started
        assert resp is not None and resp.status == 408, f"no 408 within {took:.1f}s: {resp}"
        assert conn.wait_closed(2), "the connection must be closed after 408"


def test_idle_keepalive_connection_closed(limited):
    with RawConn(limited.inbound_port, timeout=5) as conn:
        conn.send(b"GET /x HTTP/1.1\r\nHost: lim\r\n\r\n")
        assert conn.read_response().status == 200
        started = time.monotonic()
        closed = conn.wait_closed(10)
        assert closed, "an idle keep-alive connection stayed open for 10 s"
        assert time.monotonic() - started < 10


def test_slow_request_body_cut_off(limited):
    with RawConn(limited.inbound_port, timeout=12) as conn:
        conn.send(b"POST /upload HTTP/1.1\r\nHost: lim\r\nContent-Length: 1000\r\n\r\n0123456789")
        started = time.monotonic()
        try:
            resp = conn.read_response(timeout=10)
        except TimeoutError:
            resp = None
        took = time.monotonic() - started
        assert (resp is None and conn.eof) or (resp is not None and resp.status in (408, 400)), (
            f"a stalled body must be cut off (408 or close); got {resp} after {took:.1f}s"
        )
        assert took < 8, f"cut off only after {took:.1f}s"


def test_client_that_stops_reading_times_out(limited):
    sock = socket.create_connection(("127.0.0.1", limited.inbound_port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(b"GET /download?size=200000000 HTTP/1.1\r\nHost: lim\r\n\r\n")
        time.sleep(0.5)
        assert limited.status()["requests"]["inbound_active"] == 1
        wait_for(
            lambda: limited.status()["requests"]["inbound_active"] == 0,
            15,
            what="the write to a client that stopped reading to time out",
        )
    finally:
        sock.close()


def test_slowloris_1000_connections_do_not_stop_normal_requests(start_app, start_sidecar):
    app = start_app("loris")
    sc = start_sidecar(app.port, "--name", "loris")
    socks: list[socket.socket] = []
    stop = threading.Event()
    latencies: list[float] = []
    codes: list[int] = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", sc.inbound_port), timeout=2)
            s.setblocking(False)
            try:
                s.send(b"GET / HTTP/1.1\r\nHost: loris\r\n")
            except OSError:
                pass
            socks.append(s)

        def drip() -> None:
            end = time.monotonic() + 12
            n = 0
            while not stop.is_set() and time.monotonic() < end:
                for s in socks:
                    try:
                        s.send(b"X-Drip-%d: 1\r\n" % n)
                    except OSError:
                        pass
                n += 1
                stop.wait(1.0)

        dripper = threading.Thread(target=drip)
        dripper.start()
        time.sleep(1)
        for i in range(20):
            started = time.monotonic()
            codes.append(status_of(f"{sc.inbound}/normal{i}", timeout=5))
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)
    finally:
        stop.set()
        for s in socks:
            s.close()
    assert codes == [200] * 20, codes
    assert max(latencies) < 2, f"slowest normal request took {max(latencies):.2f}s"


def test_max_connections_per_listener(limited):
    socks: list[socket.socket] = []
    try:
        for _ in range(150):
            socks.append(socket.create_connection(("127.0.0.1", limited.inbound_port), timeout=2))
        time.sleep(0.5)
        refused = 0
        for s in socks:
            try:
                s.settimeout(0.2)
                s.sendall(b"GET /x HTTP/1.1\r\nHost: lim\r\n\r\n")
                data = s.recv(65536)
                if not data or data.startswith(b"HTTP/1.1 503"):
                    refused += 1
            except TimeoutError:
                refused += 1  # held in the accept queue, never served
            except OSError:
                refused += 1
        assert refused >= 50, f"150 connections with a limit of 100: only {refused} refused"
    finally:
        for s in socks:
            s.close()


def test_bounded_upstream_pool_gives_fast_503_when_full(start_app, start_sidecar):
    app = start_app("pool")
    sc = start_sidecar(app.port, "--name", "pool", "--request-timeout", "30", env=LIMIT_ENV)
    started = time.monotonic()
    answers = parallel(40, lambda i: (status_of(f"{sc.inbound}/slow?s=3", timeout=15), time.monotonic()))
    fast_503 = [code for code, at in answers if code == 503 and at - started < 1.5]
    assert len(fast_503) >= 15, f"pool 10 + queue 10, 40 requests: {[c for c, _ in answers]}"


def test_no_fd_leak_after_failures(start_sidecar, procs, tmp_path):
    app = raw_app(procs, tmp_path, name="leaky")
    sc = start_sidecar(app.port, "--name", "leaky", "--health-path", "", "--request-timeout", "1")
    assert http("GET", f"{sc.inbound}/x")[0] == 200
    time.sleep(0.5)
    baseline = fds(sc.pid)

    def failures(i: int) -> None:
        kind = i % 6
        if kind == 0:
            status_of(f"{sc.inbound}/reset")
        elif kind == 1:
            status_of(f"{sc.inbound}/short-body")
        elif kind == 2:
            status_of(f"{sc.inbound}/slow?s=3", timeout=5)  # 504
        elif kind == 3:  # a bad request
            with RawConn(sc.inbound_port) as c:
                c.send(b"GET /x HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n")
                c.wait_closed(1)
        elif kind == 4:  # the client goes away mid-request
            with RawConn(sc.inbound_port) as c:
                c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nabc")
        else:  # the client goes away before the answer
            with RawConn(sc.inbound_port) as c:
                c.send(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: a\r\n\r\n")

    parallel(10, lambda i: [failures(i * 6 + k) for k in range(6)], timeout=60)
    assert sc.popen.poll() is None
    assert http("GET", f"{sc.inbound}/x")[0] == 200
    # idle pooled connections expire after a few seconds; give them the time
    wait_for(
        lambda: fds(sc.pid) <= baseline + 2,
        15,
        what=f"fd count back to {baseline} (now {fds(sc.pid)})",
    )


# -- the Consul registry failing (tests/consul_fixtures.py) --------------------------------


def consul_pair(start_app, start_sidecar, agent, *extra: str):
    args = ("--registry", "consul", "--consul-addr", agent.addr, "--health-interval", "0.2", *extra)
    svc_app = start_app("csvc")
    svc = start_sidecar(svc_app.port, "--name", "csvc", *args)
    caller_app = start_app("ccaller")
    caller = start_sidecar(caller_app.port, "--name", "ccaller", *args)
    wait_for(lambda: status_of(f"{caller.outbound}/csvc/x") == 200, 10, what="caller reaches csvc")
    return svc, caller


@pytest.mark.parametrize("fault", ["error500", "hang", "refuse"])
def test_consul_failing_mid_run_keeps_serving_and_recovers(start_app, start_sidecar, consul_agent, fault):
    svc, caller = consul_pair(start_app, start_sidecar, consul_agent)
    consul_agent.set_fault(fault)
    try:
        time.sleep(2)
        for sc in (svc, caller):
            assert sc.popen.poll() is None
        assert status_of(f"{svc.inbound}/x", timeout=5) == 200, "inbound must not depend on the registry"
        assert status_of(f"{caller.outbound}/csvc/x", timeout=5) == 200, "known endpoints stay in use"
        started = time.monotonic()
        code = status_of(f"{caller.outbound}/never-seen/x", timeout=10)
        assert code in (502, 503, 504), code
        assert time.monotonic() - started < 6, "an unknown name with the registry down must fail fast"
    finally:
        consul_agent.set_fault("none")
    wait_for(lambda: svc.ready()[0] == 200 and caller.ready()[0] == 200, 30, what="ready again")
    assert "Traceback" not in svc.output() + caller.output()


def test_consul_wiped_the_sidecar_registers_again(start_app, start_sidecar, consul_agent):
    _svc, caller = consul_pair(start_app, start_sidecar, consul_agent)
    consul_agent.wipe()
    wait_for(
        lambda: any(s.get("Service") == "csvc" for s in consul_agent.services().values()),
        15,
        what="csvc registered again after the agent lost it",
    )
    wait_for(lambda: status_of(f"{caller.outbound}/csvc/x") == 200, 15, what="caller reaches csvc again")


def test_consul_down_at_startup_then_up(start_app, start_sidecar, consul_agent):
    consul_agent.set_fault("refuse")
    app = start_app("late")
    sc = start_sidecar(app.port, "--name", "late", "--registry", "consul", "--consul-addr", consul_agent.addr,
                       ready=False)  # fmt: skip
    wait_for(lambda: sc.status()["app"]["healthy"], 10, what="app healthy")
    assert sc.ready()[0] == 503
    assert status_of(f"{sc.inbound}/x") == 200
    consul_agent.set_fault("none")
    wait_for(lambda: sc.ready()[0] == 200, 30, what="registered once the agent is back")


def test_sigterm_with_requests_in_flight_while_consul_hangs(start_app, start_sidecar, consul_agent):
    app = start_app("term")
    sc = start_sidecar(app.port, "--name", "term", "--registry", "consul", "--consul-addr", consul_agent.addr,
                       "--drain-delay", "0.3", "--grace-period", "10")  # fmt: skip
    results: list = []
    thread = threading.Thread(target=lambda: results.append(status_of(f"{sc.inbound}/slow?s=2", timeout=20)))
    thread.start()
    time.sleep(0.3)
    consul_agent.set_fault("hang")
    try:
        sc.signal(signal.SIGTERM)
        started = time.monotonic()
        code = sc.wait(30)
        took = time.monotonic() - started
    finally:
        consul_agent.set_fault("none")
        thread.join(20)
    assert code == 0, sc.output()[-2000:]
    assert results == [200]
    assert took < 15, f"stopping took {took:.1f}s with the agent hanging"
