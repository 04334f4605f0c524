"""Traffic management seen from a caller: balancing, retries, budgets, ejection, deadlines,
metrics and access logs. Instances are real servers on 127.0.0.x registered in the local
registry; the caller is a real sidecar process."""

from __future__ import annotations

import asyncio
import json
import socket
import socketserver
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.registry.base import CheckSpec, Instance
from sidecar.registry.local import LocalRegistry
from tests.helpers import free_port, get_json, http, wait_for


class Backend(socketserver.ThreadingTCPServer):
    """A tiny HTTP/1.1 instance that counts what it receives and fails on demand.

    mode: ok | reset (read the request, then RST) | 503 | stall (never answer) | slow
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, mode: str = "ok", delay: float = 0.0) -> None:
        self.mode = mode
        self.delay = delay
        self.requests = 0
        self.request_ids: list[str] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        super().__init__((host, 0), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self) -> None:
        self.stop_event.set()
        self.shutdown()
        self.server_close()


class _Handler(socketserver.StreamRequestHandler):
    server: Backend

    def handle(self) -> None:
        while not self.server.stop_event.is_set():
            line = self.rfile.readline()
            if not line:
                return
            method = line.split(b" ", 1)[0].decode()
            headers = {}
            while (h := self.rfile.readline()) not in (b"\r\n", b""):
                key, _, value = h.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if headers.get("transfer-encoding") == "chunked":
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    self.rfile.read(size + 2)
                    if size == 0:
                        break
            elif length:
                self.rfile.read(length)
            with self.server.lock:
                self.server.requests += 1
                self.server.request_ids.append(headers.get("x-request-id", ""))
            mode = self.server.mode
            if mode == "reset":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.connection.close()
                return
            if mode == "stall":
                self.server.stop_event.wait(5)
                return
            if self.server.delay:
                time.sleep(self.server.delay)
            status = b"503 Service Unavailable" if mode == "503" else b"200 OK"
            body = json.dumps({"port": self.server.port, "method": method, "headers": headers}).encode()
            self.wfile.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            self.wfile.flush()


def register(path, name: str, backends: list[Backend]) -> None:
    async def go() -> None:
        reg = LocalRegistry(path)
        for i, b in enumerate(backends):
            host, port = b.server_address
            inst = Instance(id=f"{name}-{i}", name=name, address=host, port=port)
            await reg.register(inst, CheckSpec(ttl=300, deregister_after=300), "passing", "test")
        await reg.close()

    asyncio.run(go())


@pytest.fixture
def backends():
    made: list[Backend] = []

    def make(host: str, mode: str = "ok", delay: float = 0.0) -> Backend:
        b = Backend(host, mode, delay)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def caller(start_app, start_sidecar):
    def start(*args: str):
        app = start_app("caller")
        return start_sidecar(app.port, "--name", "caller", *args)

    return start


def access_lines(sidecar) -> list[dict]:
    return [json.loads(line) for line in sidecar.output().splitlines() if line.startswith("{")]


def run_calls(url: str, n: int, method: str = "GET", workers: int = 1, headers=None) -> list[int]:
    def one(i: int) -> int:
        return http(
            method,
            url,
            body=b"payload" if method == "POST" else None,
            headers={"X-Request-Id": f"call-{i}", **(headers or {})},
            timeout=15,
        )[0]

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.parametrize("mode", ["refuse", "reset", "503", "stall"])
def test_one_failing_instance_of_three(mode, backends, caller, registry_path):
    good = [backends("127.0.0.2"), backends("127.0.0.3")]
    if mode == "refuse":
        bad_port = free_port()  # nothing listens there: a crashed instance still registered

        class Closed:
            server_address = ("127.0.0.4", bad_port)

        bad = None
        register(registry_path, "svc", [*good, Closed()])  # type: ignore[list-item]
    else:
        bad = backends("127.0.0.4", mode)
        register(registry_path, "svc", [*good, bad])
    sc = caller("--per-try-timeout", "0.3", "--outlier-failures", "3", "--outlier-ejection-time", "30")
    n = 60
    statuses = run_calls(f"{sc.outbound}/svc/x", n)
    wait_for(lambda: len(access_lines(sc)) >= n, 5, what="one access log line per request")
    lines = [entry for entry in access_lines(sc) if entry["direction"] == "outbound"]
    attempts = sum(entry["attempts"] for entry in lines)
    ok = statuses.count(200)
    print(f"mode={mode}: success {ok}/{n} ({100 * ok / n:.0f}%), attempts/request {attempts / n:.2f}")
    assert ok == n, Counter(statuses)
    assert len(lines) == n
    assert attempts <= 1.2 * n + 30
    if bad is not None:
        # ejected after 3 failures in a row: the bad instance saw only a few requests
        assert bad.requests <= 6, bad.requests


def test_retry_budget_bounds_attempts_when_everything_fails(backends, caller, registry_path):
    bad = [backends(f"127.0.0.{i}", "503") for i in (2, 3, 4)]
    register(registry_path, "down", bad)
    sc = caller("--outlier-failures", "1000", "--retries", "2", "--retry-min-per-second", "1")
    n = 100
    statuses = run_calls(f"{sc.outbound}/down/x", n, workers=4)
    assert set(statuses) == {503}
    received = sum(b.requests for b in bad)
    print(f"all instances 503: {received} attempts for {n} requests")
    # without a budget it would be 3 x 100; the budget allows 20% + 1/s over a 10 s window
    assert received <= 1.2 * n + 10 + 1
    metrics = scrape(sc)
    assert metrics[("sidecar_retry_budget_exhausted_total", (("service", "down"),))] > 0


def test_post_without_idempotency_key_is_never_sent_twice(backends, caller, registry_path):
    good = backends("127.0.0.2")
    bad = backends("127.0.0.3", "reset")
    register(registry_path, "pay", [good, bad])
    sc = caller("--outlier-failures", "1000")
    n = 40
    statuses = run_calls(f"{sc.outbound}/pay/charge", n, method="POST")
    seen = Counter(good.request_ids + bad.request_ids)
    assert all(count == 1 for count in seen.values()), seen.most_common(3)
    assert statuses.count(502) == bad.requests > 0
    assert statuses.count(200) == good.requests
    # the same POST with an Idempotency-Key is retried elsewhere and succeeds
    statuses = run_calls(f"{sc.outbound}/pay/charge", 20, method="POST", headers={"Idempotency-Key": "k"})
    assert statuses == [200] * 20


def test_ejection_and_return(backends, caller, registry_path):
    good = backends("127.0.0.2")
    bad = backends("127.0.0.3", "503")
    register(registry_path, "ej", [good, bad, backends("127.0.0.4")])
    sc = caller("--outlier-failures", "2", "--outlier-ejection-time", "1", "--lb", "round_robin")
    run_calls(f"{sc.outbound}/ej/x", 12)
    endpoints = sc.status()["upstreams"]["ej"]["endpoints"]
    ejected = [e for e in endpoints if e["health"] == "ejected"]
    assert [e["endpoint"] for e in ejected] == [f"127.0.0.3:{bad.port}"], endpoints
    before = bad.requests
    run_calls(f"{sc.outbound}/ej/x", 10)
    assert bad.requests == before  # no traffic while ejected
    bad.mode = "ok"
    time.sleep(1.2)
    run_calls(f"{sc.outbound}/ej/x", 12)
    assert bad.requests > before  # back after the period
    assert scrape(sc)[("sidecar_ejections_total", (("service", "ej"),))] >= 1


def test_p2c_steers_load_away_from_a_slow_instance(backends, caller, registry_path):
    slow = backends("127.0.0.2", "slow", delay=0.2)
    fast = [backends("127.0.0.3"), backends("127.0.0.4")]
    register(registry_path, "p2c", [slow, *fast])
    sc = caller("--lb", "p2c")
    run_calls(f"{sc.outbound}/p2c/x", 150, workers=12)
    print(f"p2c: slow={slow.requests} fast={[f.requests for f in fast]}")
    assert slow.requests < min(f.requests for f in fast) / 2


def test_deadline_shrinks_across_two_hops(start_app, start_sidecar):
    far = start_app("far")
    start_sidecar(far.port, "--name", "far")
    near_app = start_app("near")
    near = start_sidecar(near_app.port, "--name", "near")
    status, _, body = http("GET", f"{near.outbound}/far/x", headers={"X-Request-Timeout-Ms": "5000"})
    assert status == 200
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    remaining = int(seen["x-request-timeout-ms"])
    assert 0 < remaining < 5000  # what the far app may pass on
    assert "x-sidecar-deadline-ms" not in seen  # sidecar-to-sidecar only: stripped before the app
    # an expired budget is a fast 504 from the caller's sidecar
    status, headers, _ = http("GET", f"{near.outbound}/far/slow?s=2", headers={"X-Request-Timeout-Ms": "300"})
    assert status == 504 and headers["X-Sidecar-Error"] == "upstream_timeout"


def scrape(sc) -> dict:
    status, _, body = http("GET", f"{sc.admin}/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_parse_and_match_requests(backends, caller, registry_path):
    register(registry_path, "m", [backends("127.0.0.2")])
    sc = caller()
    run_calls(f"{sc.outbound}/m/x", 7)
    run_calls(f"{sc.outbound}/nosuch/x", 2)
    values = scrape(sc)
    key = (
        "sidecar_requests_total",
        (("direction", "outbound"), ("method", "read"), ("service", "m"), ("status", "2xx")),
    )
    assert values[key] == 7, {k: v for k, v in values.items() if k[0] == "sidecar_requests_total"}
    # a name nobody registered never becomes a label value (bounded cardinality)
    key404 = (
        "sidecar_requests_total",
        (("direction", "outbound"), ("method", "read"), ("service", "-"), ("status", "4xx")),
    )
    assert values[key404] == 2
    assert values[("sidecar_app_healthy", ())] == 1
    assert any(k[0] == "process_resident_memory_bytes" for k in values)


def test_access_log_lines_are_json_without_query_strings(backends, caller, registry_path):
    register(registry_path, "log", [backends("127.0.0.2")])
    sc = caller()
    http("GET", f"{sc.outbound}/log/items?secret=hunter2", headers={"X-Request-Id": "rid-1"})
    wait_for(lambda: access_lines(sc), 5, what="an access log line")
    entry = access_lines(sc)[-1]
    assert entry["direction"] == "outbound" and entry["status"] == 200
    assert entry["request_id"] == "rid-1"
    assert "hunter2" not in sc.output()
    assert entry["path"] == "/log/items"
    assert len(entry["trace_id"]) == 32
    code, body = get_json(f"{sc.admin}/status")
    assert code == 200 and "log" in body["upstreams"]


def test_endpoint_set_change_does_not_drop_in_flight_requests(backends, caller, registry_path):
    slow = backends("127.0.0.2", "slow", delay=1.0)
    register(registry_path, "moving", [slow])
    sc = caller()
    assert http("GET", f"{sc.outbound}/moving/warm", timeout=10)[0] == 200
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(http("GET", f"{sc.outbound}/moving/x", timeout=10)[0]))
    t.start()
    time.sleep(0.3)  # the request is in flight at the slow instance

    async def replace() -> None:  # discovery now sees a different instance set
        reg = LocalRegistry(registry_path)
        await reg.deregister("moving-0")
        other = backends("127.0.0.3")
        inst = Instance(id="moving-1", name="moving", address="127.0.0.3", port=other.port)
        await reg.register(inst, CheckSpec(ttl=300, deregister_after=300), "passing", "test")
        await reg.close()

    asyncio.run(replace())
    wait_for(
        lambda: [i["id"] for i in sc.status()["upstreams"]["moving"]["instances"]] == ["moving-1"],
        5,
        what="discovery applied the new set",
    )
    t.join(10)
    assert results == [200], "the in-flight request was dropped when its endpoint left the set"
    assert http("GET", f"{sc.outbound}/moving/after")[0] == 200


# -- outlier detection that a caller can see: the failure ratio, and probes that end an
# ejection early. Each answers at once with a status chosen per request.


class ScriptedBackend(Backend):
    """A Backend whose n-th request (from 1) is answered at once with `answer(n)`."""

    def __init__(self, host: str, answer) -> None:
        self.answer = answer
        super().__init__(host)

    def finish_request(self, request, client_address) -> None:
        _ScriptedHandler(request, client_address, self)


class _ScriptedHandler(socketserver.StreamRequestHandler):
    server: ScriptedBackend

    def handle(self) -> None:
        while not self.server.stop_event.is_set():
            if not self.rfile.readline():
                return
            length = 0
            while (h := self.rfile.readline()) not in (b"\r\n", b""):
                key, _, value = h.decode().partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            if length:
                self.rfile.read(length)
            with self.server.lock:
                self.server.requests += 1
                n = self.server.requests
            status = self.server.answer(n)
            body = json.dumps({"port": self.server.port, "n": n}).encode()
            self.wfile.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (status, b"OK" if status < 400 else b"Failed", len(body), body)
            )
            self.wfile.flush()


@pytest.fixture
def scripted():
    made: list[ScriptedBackend] = []

    def make(host: str, answer) -> ScriptedBackend:
        b = ScriptedBackend(host, answer)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def ejections(sc, service: str) -> float:
    return scrape(sc).get(("sidecar_ejections_total", (("service", service),)), 0.0)


def endpoint_state(sc, service: str, backend) -> dict:
    host, port = backend.server_address
    endpoint = f"{host}:{port}"
    endpoints = sc.status()["upstreams"][service].get("endpoints", [])
    return next((e for e in endpoints if e["endpoint"] == endpoint), {})


def calls_until(url: str, done, timeout: float, batch: int = 20, workers: int = 4) -> list[int]:
    """Batches of calls until `done()` (checked after each batch) or `timeout` seconds."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        statuses += run_calls(url, batch, workers=workers)
        if done() or time.monotonic() > deadline:
            return statuses


def test_an_instance_failing_every_other_request_is_ejected(backends, scripted, caller, registry_path):
    # an instant 503 every other request: never 5 failures in a row, and fast answers kept
    # it at 0 in flight, so it was never ejected and drew most attempts (61% in a soak)
    good = backends("127.0.0.2")
    flaky = scripted("127.0.0.3", lambda n: 503 if n % 2 == 0 else 200)
    register(registry_path, "flaky", [good, flaky])
    sc = caller()  # the defaults: p2c, 5 failures in a row or half of the recent outcomes
    url = f"{sc.outbound}/flaky/x"
    started = time.monotonic()
    warm = calls_until(url, lambda: ejections(sc, "flaky") >= 1, timeout=15)
    took = time.monotonic() - started
    assert ejections(sc, "flaky") >= 1, (len(warm), flaky.requests, endpoint_state(sc, "flaky", flaky))
    before = flaky.requests, good.requests
    n = 200
    statuses = run_calls(url, n, workers=4)
    to_flaky, to_good = flaky.requests - before[0], good.requests - before[1]
    print(
        f"every-other-503: ejected after {len(warm)} calls ({took:.1f}s), {warm.count(200)} ok; "
        f"then {statuses.count(200)}/{n} ok, attempts flaky={to_flaky} good={to_good}"
    )
    assert statuses.count(200) >= 0.95 * n, Counter(statuses)
    # ejected (only its probes reach it; a lucky probe lets it back until it is ejected again)
    assert to_flaky <= 0.2 * (to_flaky + to_good), (to_flaky, to_good)


def test_an_ejected_instance_that_recovers_is_back_within_seconds(backends, scripted, caller, registry_path):
    good = backends("127.0.0.2")
    failing = {"on": True}
    bad = scripted("127.0.0.3", lambda n: 500 if failing["on"] else 200)
    register(registry_path, "blip", [good, bad])
    sc = caller("--outlier-failures", "3", "--outlier-ejection-time", "30")
    url = f"{sc.outbound}/blip/x"
    calls_until(url, lambda: endpoint_state(sc, "blip", bad).get("health") == "ejected", timeout=15)
    state = endpoint_state(sc, "blip", bad)
    assert state.get("health") == "ejected", state
    assert state["ejected_for_seconds"] > 20  # a 30 s ejection
    failing["on"] = False  # recovered
    recovered_at = time.monotonic()
    before = bad.requests
    calls_until(url, lambda: endpoint_state(sc, "blip", bad).get("health") == "healthy", timeout=10)
    took = time.monotonic() - recovered_at
    assert endpoint_state(sc, "blip", bad).get("health") == "healthy", endpoint_state(sc, "blip", bad)
    # in rotation again: it takes a fair share of the traffic, and every call succeeds
    n = 100
    mark = bad.requests
    statuses = run_calls(url, n, workers=2)
    share = bad.requests - mark
    print(f"500s then recovered: back after {took:.1f}s ({mark - before} calls reached it), then {share}/{n}")
    assert statuses == [200] * n, Counter(statuses)
    assert share >= 0.2 * n
    assert took < 20  # well before the 30 s ejection would have ended
