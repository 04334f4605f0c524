"""Reliability of the retry, balancing and pooling path (issue 12), seen from outside.

One test (or a few) per defect of issue 12, each reproducing it through real sidecar
processes on loopback: a caller sidecar, and instances that are either real sidecars in
front of a recording app (tests/apps/upload_app.py) or recording apps registered in the
local registry directly (as tests/test_traffic.py does). Raw sockets are used where the
framing or the timing of a request matters (an early answer, a slow or aborted upload, a
client that leaves). Every process is started through the `procs` list, so everything
is stopped even when a test fails; every loop is bounded in count and in time, and the
tests assert outcomes (what the client got, what the apps recorded, what /status says),
never timings, except where the defect is one (the work a departed client leaves behind).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sidecar.registry.base import CheckSpec, Instance
from sidecar.registry.local import LocalRegistry
from tests.faultproxy import RawConn, RawResponse
from tests.helpers import ReportedPortProc, Sidecar, free_port, http, wait_for

SERVICE = "orders"
BODY_LEN = 2000
WAIT = 15.0  # generous: a loaded 2-core machine runs these


# -- the recording app, instances, and the caller ----------------------------------------


class UploadApp(ReportedPortProc):
    """tests/apps/upload_app.py as a process: it records every request head and end. On a
    port the kernel picks (port 0), which the app reports."""

    def __init__(self, record: Path, mode: str, delay: float, name: str, host: str) -> None:
        self.host = host
        self.record = record
        self.name = name
        super().__init__(
            [
                sys.executable,
                "-m",
                "tests.apps.upload_app",
                "--port",
                "0",
                "--host",
                host,
                "--record",
                str(record),
                "--mode",
                mode,
                "--delay",
                str(delay),
                "--name",
                name,
            ]
        )

    def wait_up(self) -> UploadApp:
        self.wait_listening(WAIT)
        return self

    def records(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]

    def heads(self, rid: str | None = None) -> list[dict]:
        return [r for r in self.records() if r["event"] == "head" and (rid is None or r["rid"] == rid)]

    def ends(self, rid: str | None = None) -> list[dict]:
        return [r for r in self.records() if r["event"] == "end" and (rid is None or r["rid"] == rid)]

    def control(self, **params: str) -> None:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        status, _, body = http("GET", f"http://{self.host}:{self.port}/_control?{query}", timeout=5)
        assert status == 200, body


@pytest.fixture
def upload_app(procs, tmp_path):
    def start(name: str, mode: str = "store", delay: float = 0.0, host: str = "127.0.0.1") -> UploadApp:
        app = UploadApp(tmp_path / f"{name}.jsonl", mode, delay, name, host)
        procs.append(app)
        return app.wait_up()

    return start


@pytest.fixture
def sidecars(procs, registry_path):
    """Start several sidecars at once (each: (app_port, *args), or a dict with env), then
    wait for all of them: parallel start-ups keep the file fast."""

    def start(*specs, ready: bool = True) -> list[Sidecar]:
        made = []
        for spec in specs:
            env = None
            if isinstance(spec, dict):
                env, spec = spec.get("env"), spec["args"]
            sc = Sidecar(spec[0], *spec[1:], registry_path=registry_path, env=env)
            procs.append(sc)
            made.append(sc)
        for sc in made:
            if ready:
                sc.wait_ready(WAIT)
            else:
                sc.wait_started(WAIT)
        return made

    return start


def register(path: Path, instances: list[tuple[str, str, int]], ttl: float = 300) -> None:
    """Put instances (id, host, port) of SERVICE in the local registry, passing."""

    async def go() -> None:
        reg = LocalRegistry(path)
        try:
            for instance_id, host, port in instances:
                inst = Instance(id=instance_id, name=SERVICE, address=host, port=port)
                await reg.register(inst, CheckSpec(ttl=ttl, deregister_after=300), "passing", "test")
        finally:
            await reg.close()

    asyncio.run(go())


def deregister(path: Path, instance_id: str) -> None:
    async def go() -> None:
        reg = LocalRegistry(path)
        try:
            await reg.deregister(instance_id)
        finally:
            await reg.close()

    asyncio.run(go())


def upstream(sc: Sidecar, service: str = SERVICE) -> dict:
    return sc.status()["upstreams"].get(service) or {}


def instance_ids(sc: Sidecar, service: str = SERVICE) -> list[str]:
    return sorted(i["id"] for i in upstream(sc, service).get("instances", []))


def endpoints(sc: Sidecar, service: str = SERVICE) -> list[dict]:
    return upstream(sc, service).get("endpoints", [])


def settled(sc: Sidecar, service: str = SERVICE) -> bool:
    """Nothing in flight any more, in the balancer and in the forwarder's per-endpoint slots."""
    status = sc.status()
    up = status["upstreams"].get(service) or {}
    return up.get("outstanding") == 0 and status["requests"]["outbound_active"] == 0


def access_lines(sc: Sidecar) -> list[dict]:
    return [json.loads(line) for line in sc.output().splitlines() if line.startswith("{")]


def caller_args(*extra: str) -> tuple:
    return ("--name", "caller", "--request-timeout", "8", *extra)


def start_caller(upload_app, sidecars, *extra: str, env: dict | None = None) -> Sidecar:
    app = upload_app("caller-app")
    spec = (app.port, *caller_args(*extra))
    return sidecars({"args": spec, "env": env} if env else spec)[0]


def start_instances(upload_app, sidecars, count: int, mode: str = "store", delay: float = 0.0):
    """`count` real instances of SERVICE: a recording app behind a sidecar each."""
    apps = [upload_app(f"inst{i}", mode, delay) for i in range(count)]
    scs = sidecars(*[(a.port, "--name", SERVICE) for a in apps])
    return apps, scs


def warm(sc: Sidecar, n: int) -> None:
    """Let the caller discover SERVICE with n instances."""
    http("GET", f"{sc.outbound}/{SERVICE}/warm", timeout=WAIT)
    wait_for(lambda: len(instance_ids(sc)) == n, WAIT, what=f"{n} instances of {SERVICE} discovered")


# -- raw requests ------------------------------------------------------------------------


def body_bytes(n: int = BODY_LEN) -> bytes:
    return bytes(ord("a") + i % 26 for i in range(n))


def upload_parts(framing: str, body: bytes, pieces: int = 4) -> tuple[str, list[bytes]]:
    """The framing header and the wire bytes of the body in `pieces` parts (chunked: one
    chunk per part, the last chunk with the last part)."""
    size = len(body) // pieces
    parts = [body[i * size : (i + 1) * size if i < pieces - 1 else len(body)] for i in range(pieces)]
    if framing == "length":
        return f"Content-Length: {len(body)}", parts
    wire = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts]
    wire[-1] += b"0\r\n\r\n"
    return "Transfer-Encoding: chunked", wire


def head(method: str, target: str, rid: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"X-Request-Id: {rid}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def slow_upload(
    port: int, method: str, target: str, rid: str, framing: str, pause: float, timeout: float = 12.0
) -> RawResponse | None:
    """Send the head and the first half of the body, wait `pause`, send the rest; the answer."""
    body = body_bytes()
    framing_header, parts = upload_parts(framing, body)
    with RawConn(port, timeout=timeout) as conn:
        conn.send(
            head(method, target, rid, framing_header, f"X-Body-Length: {len(body)}") + b"".join(parts[:2])
        )
        time.sleep(pause)
        try:
            conn.send(b"".join(parts[2:]))
        except OSError:
            pass  # an answer and a close may already have come
        try:
            return conn.read_response(method, timeout)
        except TimeoutError:
            return None


def stored(apps: list[UploadApp]) -> list[dict]:
    """Every body an app took as whole and answered 200 for."""
    return [r for a in apps for r in a.ends() if r["outcome"] == "answered 200"]


def assert_no_short_body(apps: list[UploadApp]) -> None:
    short = [r for r in stored(apps) if r["expected"] is not None and r["received"] != r["expected"]]
    assert not short, f"an app stored a body shorter than the client sent: {short}"


# -- D2: an early answer says Connection: close, and the connection closes ----------------


def early_answer(port: int, target: str, framing: str) -> tuple[RawResponse | None, bool]:
    """POST with a body, head first; the answer read before the body is sent; then the body
    is sent and we see whether the sidecar closes. (answer, closed)"""
    body = body_bytes(1000)
    framing_header, parts = upload_parts(framing, body)
    with RawConn(port, timeout=WAIT) as conn:
        conn.send(head("POST", target, f"early-{framing}", framing_header))
        resp = conn.read_response("POST", WAIT)
        try:
            conn.send(b"".join(parts))
        except OSError:
            pass
        return resp, conn.wait_closed(5.0)


def assert_closing_answer(what: str, got: tuple[RawResponse | None, bool], status: int, code: str) -> None:
    resp, closed = got
    assert resp is not None and resp.status == status, f"{what}: {resp}"
    assert resp.header("X-Sidecar-Error") == code, f"{what}: {resp.headers}"
    connection = (resp.header("Connection") or "").lower()
    assert connection == "close", f"{what}: an early answer without Connection: close: {resp.headers}"
    assert closed, f"{what}: the connection stayed open after an early answer"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_d2_early_answers_say_connection_close(framing, upload_app, sidecars, registry_path):
    sick = upload_app("sick")
    sick.control(health="fail")
    down = upload_app("down")
    # `sick`: probes fail from the start; `down`: probed rarely, so its app dies unnoticed
    sick_sc, down_sc = sidecars(
        (sick.port, "--name", "sick"),
        (down.port, "--name", "down", "--health-path", "", "--health-interval", "60"),
        ready=False,
    )
    wait_for(lambda: down_sc.ready()[0] == 200, WAIT, what="the down sidecar ready")
    down.stop()

    got = early_answer(sick_sc.inbound_port, "/x", framing)
    assert_closing_answer("inbound, app unhealthy", got, 503, "app_unhealthy")
    got = early_answer(down_sc.inbound_port, "/x", framing)
    assert_closing_answer("inbound, app down", got, 502, "upstream_connect_failed")

    # the outbound side: an unknown name, and a name whose every instance is gone
    got = early_answer(down_sc.outbound_port, "/nosuch/x", framing)
    assert_closing_answer("outbound, unknown service", got, 404, "unknown_service")
    register(registry_path, [("ghost-0", "127.0.0.1", free_port())], ttl=0.5)
    time.sleep(1.0)  # its TTL runs out: known, but no live instance
    got = early_answer(down_sc.outbound_port, f"/{SERVICE}/x", framing)
    assert_closing_answer("outbound, no healthy instance", got, 503, "no_healthy_instance")


def test_d2_answers_during_drain_say_connection_close(upload_app, sidecars):
    app = upload_app("draining")
    (sc,) = sidecars((app.port, "--name", "draining", "--drain-delay", "4", "--grace-period", "2"))
    with RawConn(sc.inbound_port, timeout=WAIT) as pooled:  # a caller's pooled connection
        pooled.send(head("GET", "/before", "drain-0"))
        before = pooled.read_response("GET", WAIT)
        assert before is not None and before.status == 200
        assert (before.header("Connection") or "").lower() != "close", before.headers
        sc.signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in sc.output(), WAIT, what="the sidecar starts stopping")

        def fresh_answer_closes() -> bool:
            with RawConn(sc.inbound_port, timeout=WAIT) as conn:
                conn.send(head("GET", "/during", "drain-1"))
                resp = conn.read_response("GET", WAIT)
                assert resp is not None and resp.status == 200, resp
                return (resp.header("Connection") or "").lower() == "close"

        wait_for(
            fresh_answer_closes, 3.0, interval=0.1, what="an answer with Connection: close while draining"
        )
        pooled.send(head("GET", "/during-pooled", "drain-2"))
        resp = pooled.read_response("GET", WAIT)
        assert resp is not None and resp.status == 200, resp
        assert (resp.header("Connection") or "").lower() == "close", resp.headers
        assert pooled.wait_closed(3.0), "the pooled connection stayed open while draining"
    assert sc.popen.poll() is None, "the sidecar stopped before its drain delay was over"


# -- D3: a retried upload is sent again whole, or not at all ------------------------------


@pytest.mark.parametrize("cause", ["early_503", "per_try_timeout"])
def test_d3_retried_put_is_sent_whole(cause, upload_app, sidecars, registry_path):
    if cause == "early_503":
        # one instance answers 503 on the head, before the body: the PUT is retried while
        # its body is still arriving
        apps = [upload_app("early", "early503"), upload_app("good")]
        extra: tuple[str, ...] = ()
        pause = 0.4
    else:
        # every first attempt ends by the per-try timeout half way through the upload;
        # the next one gets the rest of the body in time
        apps = [upload_app("a"), upload_app("b")]
        extra = ("--per-try-timeout", "0.6")
        pause = 0.9
    register(registry_path, [(f"{SERVICE}-{i}", "127.0.0.1", a.port) for i, a in enumerate(apps)])
    sc = start_caller(
        upload_app,
        sidecars,
        "--lb",
        "round_robin",
        "--outlier-failures",
        "1000",
        "--retry-min-per-second",
        "100",
        *extra,
    )
    warm(sc, 2)
    results = {}
    for framing in ("length", "chunked"):
        for i in range(3):
            rid = f"put-{framing}-{i}"
            resp = slow_upload(sc.outbound_port, "PUT", f"/{SERVICE}/store", rid, framing, pause)
            results[rid] = None if resp is None else resp.status
    assert_no_short_body(apps)
    assert results == dict.fromkeys(results, 200), f"PUTs did not all succeed: {results}"
    for rid in results:
        whole = [r for r in stored(apps) if r["rid"] == rid]
        assert len(whole) == 1 and whole[0]["received"] == BODY_LEN, (rid, whole)
    if cause == "early_503":
        assert apps[0].heads(), "the early-503 instance was never tried: the scenario did not happen"
    else:
        tried_twice = [rid for rid in results if sum(len(a.heads(rid)) for a in apps) >= 2]
        assert tried_twice, "no first attempt was cut by the per-try timeout: the scenario did not happen"


# -- D4: a client that gives up mid-upload is not the instance's fault --------------------


def test_d4_client_abort_mid_upload_is_not_charged_or_retried(upload_app, sidecars):
    apps, _ = start_instances(upload_app, sidecars, 2)
    sc = start_caller(upload_app, sidecars)
    warm(sc, 2)
    for i in range(4):  # a few successes first, so the endpoints have stats
        assert http("GET", f"{sc.outbound}/{SERVICE}/ok{i}", timeout=WAIT)[0] == 200
    rids = []
    for i in range(6):
        framing = "length" if i % 2 == 0 else "chunked"
        rid = f"abort-{i}"
        rids.append(rid)
        framing_header, parts = upload_parts(framing, body_bytes())
        conn = RawConn(sc.outbound_port, timeout=WAIT)
        try:
            conn.send(head("PUT", f"/{SERVICE}/store", rid, framing_header, f"X-Body-Length: {BODY_LEN}"))
            conn.send(b"".join(parts[:2]))
            wait_for(lambda rid=rid: any(a.heads(rid) for a in apps), WAIT, what=f"an instance got {rid}")
        finally:
            conn.close()  # the client gives up half way
        wait_for(lambda rid=rid: any(a.ends(rid) for a in apps), WAIT, what=f"the instance saw {rid} cut")
    wait_for(lambda: settled(sc), WAIT, what="no request in flight at the caller")
    time.sleep(0.5)  # room for a (wrong) retry to arrive
    for rid in rids:
        heads = [r for a in apps for r in a.heads(rid)]
        assert len(heads) == 1, f"{rid}: the aborted PUT was sent again: {heads}"
    assert not [r for r in stored(apps) if r["rid"] in rids], "an app answered a cut upload as stored"
    for ep in endpoints(sc):
        assert ep["health"] == "healthy", ep
        assert ep["failures"] == 0 and ep["consecutive_failures"] == 0, f"a client abort was charged: {ep}"


# -- D5: retried 502/503/504 answers give back their slot ---------------------------------


def test_d5_retried_503s_do_not_leak_pool_slots(upload_app, sidecars, registry_path):
    flaky, good = upload_app("flaky", "status:503"), upload_app("good")
    register(
        registry_path, [(f"{SERVICE}-0", "127.0.0.1", flaky.port), (f"{SERVICE}-1", "127.0.0.1", good.port)]
    )
    env = {"MICRO_SIDECAR_UPSTREAM_MAX_CONNECTIONS": "2", "MICRO_SIDECAR_UPSTREAM_MAX_PENDING": "2"}
    sc = start_caller(
        upload_app,
        sidecars,
        "--lb",
        "round_robin",
        "--outlier-failures",
        "1000",
        "--retry-min-per-second",
        "100",
        env=env,
    )
    warm(sc, 2)
    statuses = []
    for i in range(30):
        status, headers, _ = http("GET", f"{sc.outbound}/{SERVICE}/r{i}", headers={"X-Request-Id": f"r{i}"})
        statuses.append((status, headers.get("X-Sidecar-Error")))
    assert statuses == [(200, None)] * 30, f"GETs with a retried 503 failed: {Counter(statuses)}"
    retried = [r for r in flaky.ends() if r["outcome"] == "answered 503"]
    assert len(retried) > 4, f"only {len(retried)} 503s from the flaky instance: not more than its 4 slots"

    flaky.control(mode="store")  # it recovers: it must get traffic again
    served = []
    deadline = time.monotonic() + 12
    for i in range(120):
        if time.monotonic() > deadline or len(stored([flaky])) >= 3:
            break
        status, headers, _ = http("GET", f"{sc.outbound}/{SERVICE}/after{i}", timeout=WAIT)
        served.append((status, headers.get("X-Sidecar-Error")))
        time.sleep(0.05)
    assert set(served) == {(200, None)}, Counter(served)
    assert len(stored([flaky])) >= 3, (
        f"the instance that answered {len(retried)} retried 503s never served again: {endpoints(sc)}"
    )
    wait_for(lambda: settled(sc), WAIT, what="no request in flight at the caller")


# -- D6: an app's relayed X-Sidecar-Error does not make a POST run twice ------------------


def test_d6_app_relayed_sidecar_error_does_not_retry_post(upload_app, sidecars):
    apps, _ = start_instances(upload_app, sidecars, 2, mode="relay502")
    sc = start_caller(upload_app, sidecars)
    warm(sc, 2)
    for i in range(4):
        rid = f"post-{i}"
        status, headers, body = http(
            "POST",
            f"{sc.outbound}/{SERVICE}/charge",
            body=b"pay",
            headers={"X-Request-Id": rid},
            timeout=WAIT,
        )
        assert status == 502, (status, body)
        assert "X-Sidecar-Error" not in headers, f"the app's X-Sidecar-Error reached the client: {headers}"
        heads = [r for a in apps for r in a.heads(rid)]
        assert len(heads) == 1, f"{rid}: the POST ran {len(heads)} times: {heads}"


# -- D7: a connect cut by the per-try timeout was never sent: retried for a POST ----------


class Blackhole:
    """A listening socket whose accept queue is full: further SYNs are dropped, so a
    connect to it never completes."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.address = self.sock.getsockname()
        self.fillers: list[socket.socket] = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.address)
            self.fillers.append(filler)
            if not self._completes(filler):
                break
        try:  # one more connect must hang now
            socket.create_connection(self.address, timeout=0.5).close()
        except TimeoutError:
            return
        self.close()
        raise AssertionError("the blackhole still completes connections")

    @staticmethod
    def _completes(sock: socket.socket) -> bool:
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            try:
                sock.getpeername()
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def close(self) -> None:
        for s in [*self.fillers, self.sock]:
            s.close()


@pytest.fixture
def blackhole():
    hole = Blackhole()
    yield hole
    hole.close()


def test_d7_post_cut_in_connect_by_per_try_timeout_is_retried(blackhole, upload_app, sidecars, registry_path):
    good = upload_app("good")
    host, port = blackhole.address
    register(registry_path, [(f"{SERVICE}-0", host, port), (f"{SERVICE}-1", "127.0.0.1", good.port)])
    sc = start_caller(
        upload_app,
        sidecars,
        "--per-try-timeout",
        "0.3",
        "--connect-timeout",
        "2",
        "--lb",
        "round_robin",
        "--outlier-failures",
        "1000",
    )
    wait_for(
        lambda: http("GET", f"{sc.outbound}/{SERVICE}/warm", timeout=WAIT)[0] == 200, WAIT, what="warm-up"
    )
    wait_for(lambda: len(instance_ids(sc)) == 2, WAIT, what="2 instances discovered")
    results = {}
    for i in range(8):
        rid = f"post-{i}"
        status, headers, _ = http(
            "POST",
            f"{sc.outbound}/{SERVICE}/charge",
            body=b"pay",
            headers={"X-Request-Id": rid},
            timeout=WAIT,
        )
        results[rid] = (status, headers.get("X-Sidecar-Error"))
    assert results == dict.fromkeys(results, (200, None)), f"POSTs never sent were not retried: {results}"
    for rid in results:
        assert len(good.heads(rid)) == 1, (rid, good.heads(rid))
    wait_for(lambda: len(access_lines(sc)) >= 9, WAIT, what="the access log lines")
    posts = [e for e in access_lines(sc) if e.get("method") == "POST" and e.get("direction") == "outbound"]
    assert any(e["attempts"] >= 2 for e in posts), f"the blackhole was never tried: {posts}"


# -- D8: the caller's short deadline does not eject healthy instances ---------------------


def test_d8_caller_deadline_does_not_eject_instances(upload_app, sidecars):
    start_instances(upload_app, sidecars, 2, delay=0.3)
    sc = start_caller(upload_app, sidecars)
    warm(sc, 2)
    statuses = []
    for i in range(12):
        status, _, _ = http(
            "GET", f"{sc.outbound}/{SERVICE}/slow{i}", headers={"X-Request-Timeout-Ms": "100"}, timeout=WAIT
        )
        statuses.append(status)
    assert statuses == [504] * 12, statuses
    wait_for(lambda: settled(sc), WAIT, what="no request in flight at the caller")
    eps = endpoints(sc)
    assert len(eps) == 2, eps
    for ep in eps:
        assert ep["health"] == "healthy", f"a caller's short deadline ejected an instance: {ep}"
        assert ep["failures"] == 0 and ep["consecutive_failures"] == 0, (
            f"the caller's deadline was charged: {ep}"
        )


# -- D9: a client that leaves cancels the work at every hop -------------------------------


def test_d9_client_that_leaves_cancels_upstream_work(upload_app, sidecars):
    apps, _ = start_instances(upload_app, sidecars, 2, delay=3.0)
    sc = start_caller(upload_app, sidecars)
    warm(sc, 2)
    wait_for(lambda: settled(sc), WAIT, what="the warm-up over")
    for i in range(2):
        rid = f"leave-{i}"
        conn = RawConn(sc.outbound_port, timeout=WAIT)
        try:
            conn.send(head("GET", f"/{SERVICE}/slow", rid))
            time.sleep(0.2)
            wait_for(lambda rid=rid: any(a.heads(rid) for a in apps), WAIT, what=f"an app got {rid}")
        finally:
            conn.close()
            left_at = time.time()
        ended = wait_for(
            lambda rid=rid: [r for a in apps for r in a.ends(rid)], 6.0, what=f"the app's request {rid} ended"
        )
        assert ended[0]["outcome"] == "aborted", f"the app ran its 3 s for a client that left: {ended}"
        assert ended[0]["time"] - left_at < 1.5, (
            f"the app's work was cancelled late: {ended}, left at {left_at}"
        )
        time.sleep(0.3)  # room for a (wrong) retry to arrive
        heads = [r for a in apps for r in a.heads(rid)]
        assert len(heads) == 1, f"{rid} was retried after its client left: {heads}"
    wait_for(lambda: settled(sc), WAIT, what="no request in flight at the caller")


# -- D10: a retry re-reads the instance list ----------------------------------------------


def test_d10_retry_uses_the_live_instance_list(upload_app, sidecars, registry_path):
    old = upload_app("old", "status:503", delay=4.0)  # slow, then 503: retried
    register(registry_path, [(f"{SERVICE}-old", "127.0.0.1", old.port)])
    sc = start_caller(upload_app, sidecars)
    result: list = []

    def call() -> None:
        try:
            result.append(
                http("GET", f"{sc.outbound}/{SERVICE}/x", headers={"X-Request-Id": "moved"}, timeout=20)
            )
        except (OSError, urllib.error.URLError) as exc:
            result.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    try:
        wait_for(lambda: old.heads("moved"), WAIT, what="the old instance got the request")
        new = upload_app("new")
        register(registry_path, [(f"{SERVICE}-new", "127.0.0.1", new.port)])
        deregister(registry_path, f"{SERVICE}-old")
        wait_for(lambda: instance_ids(sc) == [f"{SERVICE}-new"], WAIT, what="the caller saw the new set")
        assert not old.ends("moved"), "the old instance answered before discovery changed: too slow a machine"
    finally:
        thread.join(20)
    assert result and not isinstance(result[0], Exception), result
    status, _, body = result[0]
    assert status == 200, f"the retry went to an instance that had left: {status} {body[:200]!r}"
    assert len(new.heads("moved")) == 1 and len(old.heads("moved")) == 1, (
        new.heads("moved"),
        old.heads("moved"),
    )


# -- D1: a dead instance that is still registered does not soak up the traffic ------------


def test_d1_dead_registered_instance_with_one_ejected(upload_app, sidecars, registry_path):
    apps, _ = start_instances(upload_app, sidecars, 2)
    sc = start_caller(upload_app, sidecars)
    warm(sc, 2)
    # eject one of the two live instances with a few 500s (max 50%: only one can be)
    for a in apps:
        a.control(mode="status:500")
    deadline = time.monotonic() + WAIT
    for i in range(60):
        if time.monotonic() > deadline or any(e["health"] == "ejected" for e in endpoints(sc)):
            break
        http("GET", f"{sc.outbound}/{SERVICE}/fail{i}", timeout=WAIT)
    assert any(e["health"] == "ejected" for e in endpoints(sc)), endpoints(sc)
    for a in apps:
        a.control(mode="store")
    # a third instance, registered, whose port is closed (a SIGKILLed sidecar before its TTL)
    register(registry_path, [(f"{SERVICE}-dead", "127.0.0.1", free_port())])
    wait_for(lambda: len(instance_ids(sc)) == 3, WAIT, what="the dead instance discovered")

    stop_at = time.monotonic() + 4.0

    def client(n: int) -> list[tuple[str, int, str | None]]:
        got = []
        for i in range(400):
            if time.monotonic() > stop_at:
                break
            method = "GET" if i % 2 == 0 else "POST"
            try:
                status, headers, _ = http(
                    method,
                    f"{sc.outbound}/{SERVICE}/soak",
                    body=b"x" * 100 if method == "POST" else None,
                    headers={"X-Request-Id": f"c{n}-{i}"},
                    timeout=WAIT,
                )
                got.append((method, status, headers.get("X-Sidecar-Error")))
            except OSError as exc:
                got.append((method, -1, type(exc).__name__))
        return got

    with ThreadPoolExecutor(32) as pool:
        outcomes = [o for chunk in pool.map(client, range(32)) for o in chunk]
    counts = Counter((m, s, e) for m, s, e in outcomes)
    ok = sum(1 for _, s, _ in outcomes if s == 200)
    print(f"dead instance + one ejected: {ok}/{len(outcomes)} ok; {counts.most_common(6)}")
    assert len(outcomes) >= 100, f"too few requests to judge: {len(outcomes)}"
    assert ok >= 0.99 * len(outcomes), counts.most_common(8)
    never_sent = [o for o in outcomes if o[2] == "upstream_connect_failed"]
    assert not never_sent, (
        f"requests refused by the dead instance were not retried elsewhere: {Counter(never_sent)}"
    )
    assert sc.popen.poll() is None, "the caller sidecar died"
