"""Security properties of issue 5: loopback-only listeners, no open proxy, a read-only admin,
no token in any output, and aiohttp's C parser in use.

Decoy listeners on 127.0.0.x ports stand where an open proxy would connect; they count
accept() calls, so "refused" means "no connection was even attempted".
"""

from __future__ import annotations

import contextlib
import select
import socket
import subprocess
import threading
import time
import uuid

import pytest

from tests.faultproxy import FaultProxy, exchange
from tests.helpers import App, Sidecar, free_port, http, wait_for


class Decoy:
    """A listener that only counts the connections it accepts."""

    def __init__(self, host: str, port: int | None = None) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port or 0))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()[:2]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def decoys():
    made: list[Decoy] = []

    def make(host: str, port: int | None = None) -> Decoy:
        decoy = Decoy(host, port)
        made.append(decoy)
        return decoy

    yield make
    for decoy in made:
        decoy.close()


def non_loopback_address() -> str | None:
    try:
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                addr, hexport = fields[1].split(":")
                if fields[3] == "0A" and int(hexport, 16) == port:
                    if len(addr) == 8:
                        found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                    else:
                        raw = b"".join(bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, 32, 8))
                        found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


# -- listeners bound to loopback ----------------------------------------------------------


def test_outbound_and_admin_listen_on_loopback_only(start_app, start_sidecar):
    app = start_app()
    sc = start_sidecar(app.port)
    addresses = sc.status()["addresses"]
    for name, port in (("outbound", sc.outbound_port), ("admin", sc.admin_port)):
        assert addresses[name].startswith("127."), addresses
        bound = listening_addresses(port)
        assert bound and all(a.startswith("127.") or a == "::1" for a in bound), f"{name} bound to {bound}"
        other = non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()


def test_shutdown_is_post_and_loopback_only(start_app, start_sidecar):
    other = non_loopback_address()
    app = start_app()
    sc = start_sidecar(app.port, "--admin-host", "0.0.0.0")
    assert http("GET", f"{sc.admin}/shutdown")[0] == 405
    if other is None:
        pytest.skip("no non-loopback address on this machine to call /shutdown from")
    code, _, _ = http("POST", f"http://{other}:{sc.admin_port}/shutdown")
    assert code == 403, code
    time.sleep(0.5)
    assert sc.popen.poll() is None and not sc.status()["stopping"]


ADMIN_PATHS = ["/live", "/ready", "/status", "/metrics", "/", "/config", "/reload", "/drain", "/deregister",
               "/register", "/log-level", "/logging", "/quitquitquit", "/healthcheck/fail", "/runtime_modify",
               "/debug/pprof", "/admin", "/stop", "/kill", "/restart", "/maintenance"]  # fmt: skip


def test_admin_has_no_other_state_changing_endpoint(start_app, start_sidecar):
    app = start_app()
    sc = start_sidecar(app.port)
    bad = []
    for path in ADMIN_PATHS:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            code = http(method, f"{sc.admin}{path}", body=b"{}")[0]
            if code not in (404, 405):
                bad.append((method, path, code))
    assert not bad, f"state-changing methods answered: {bad}"
    assert sc.ready()[0] == 200 and sc.popen.poll() is None


# -- no open proxy --------------------------------------------------------------------------


def open_proxy_requests(p1: int, p2: int, outbound: int) -> list[tuple[str, bytes]]:
    d1 = f"127.0.0.5:{p1}"
    return [
        ("absolute_ip", f"GET http://{d1}/x HTTP/1.1\r\nHost: {d1}\r\n"),
        ("host_ip", f"GET /x HTTP/1.1\r\nHost: {d1}\r\n"),
        ("absolute_localhost", f"GET http://localhost:{p2}/x HTTP/1.1\r\nHost: localhost:{p2}\r\n"),
        ("host_localhost", f"GET /x HTTP/1.1\r\nHost: localhost:{p2}\r\n"),
        ("host_localhost_no_port", "GET /x HTTP/1.1\r\nHost: localhost\r\n"),
        ("absolute_127_0_0_1", f"GET http://127.0.0.1:{p2}/x HTTP/1.1\r\nHost: 127.0.0.1:{p2}\r\n"),
        ("prefix_ip", f"GET /{d1}/x HTTP/1.1\r\nHost: 127.0.0.1:{outbound}\r\n"),
        ("prefix_localhost", f"GET /localhost:{p2}/x HTTP/1.1\r\nHost: 127.0.0.1:{outbound}\r\n"),
        ("decimal_ip", f"GET http://2130706437:{p1}/x HTTP/1.1\r\nHost: 2130706437:{p1}\r\n"),
        ("hex_ip", f"GET http://0x7f000005:{p1}/x HTTP/1.1\r\nHost: 0x7f000005:{p1}\r\n"),
        ("short_ip", f"GET http://127.5:{p1}/x HTTP/1.1\r\nHost: 127.5:{p1}\r\n"),
        ("mapped_v6", f"GET http://[::ffff:127.0.0.5]:{p1}/x HTTP/1.1\r\nHost: [::ffff:127.0.0.5]:{p1}\r\n"),
        ("userinfo", f"GET http://real@{d1}/x HTTP/1.1\r\nHost: {d1}\r\n"),
        ("metadata", "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n"),
        ("metadata_host", "GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n"),
        ("unregistered", "GET /x HTTP/1.1\r\nHost: nosuch-service\r\n"),
        ("unregistered_absolute", "GET http://nosuch-service/x HTTP/1.1\r\nHost: nosuch-service\r\n"),
        ("connect_ip", f"CONNECT {d1} HTTP/1.1\r\nHost: {d1}\r\n"),
    ]


CASE_NAMES = [name for name, _ in open_proxy_requests(1, 2, 3)]


@pytest.fixture(scope="module")
def proxy_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    started = []
    try:
        app = App("real")
        started.append(app)
        app.wait_up()
        sc = Sidecar(app.port, "--name", "real", registry_path=tmp / "r.sqlite3")
        started.append(sc)
        sc.wait_ready()
        yield sc
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.mark.parametrize("listener", ["outbound", "inbound"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_no_open_proxy(proxy_stack, decoys, listener, name):
    sc = proxy_stack
    d1 = decoys("127.0.0.5")
    d2 = decoys("127.0.0.1")
    request = dict(open_proxy_requests(d1.port, d2.port, sc.outbound_port))[name]
    port = sc.outbound_port if listener == "outbound" else sc.inbound_port
    started = time.monotonic()
    ex = exchange(port, (request + "Connection: close\r\n\r\n").encode(), timeout=5)
    took = time.monotonic() - started
    time.sleep(0.1)
    assert d1.accepted == 0 and d2.accepted == 0, (
        f"{name}: the sidecar connected to a decoy ({ex.describe()})"
    )
    if listener == "outbound":
        assert ex.first.status is not None and 400 <= ex.first.status < 500, f"{name}: {ex.describe()}"
        assert took < 2, f"{name}: took {took:.1f}s (a connection attempt?)"


def test_registered_name_with_a_decoy_port_goes_to_the_registry_endpoint(proxy_stack, decoys):
    d1 = decoys("127.0.0.1")
    ex = exchange(
        proxy_stack.outbound_port,
        f"GET /x HTTP/1.1\r\nHost: real:{d1.port}\r\nConnection: close\r\n\r\n".encode(),
    )
    time.sleep(0.1)
    assert d1.accepted == 0, ex.describe()


def test_consul_agent_address_is_never_proxied(start_app, start_sidecar, consul_agent):
    with FaultProxy(consul_agent.port) as tap:
        app = start_app("cproxy")
        sc = start_sidecar(
            app.port, "--name", "cproxy", "--registry", "consul", "--consul-addr", f"127.0.0.1:{tap.port}"
        )
        for target, host in (
            (f"http://127.0.0.1:{tap.port}/v1/kv/open-proxy-probe", f"127.0.0.1:{tap.port}"),
            ("/v1/kv/open-proxy-probe", f"127.0.0.1:{tap.port}"),
            ("/v1/kv/open-proxy-probe", "consul"),
            (f"http://localhost:{tap.port}/v1/kv/open-proxy-probe", f"localhost:{tap.port}"),
        ):
            ex = exchange(
                sc.outbound_port,
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert ex.first.status is not None and 400 <= ex.first.status < 500, (target, host, ex.describe())
        time.sleep(0.2)
        assert b"open-proxy-probe" not in bytes(tap.sent_upstream)


# -- the ACL token never shows --------------------------------------------------------------


def test_token_sentinel_never_in_logs_status_errors_or_urls(start_app, start_sidecar, consul_agent_acl):
    sentinel = f"sentinel-{uuid.uuid4()}"
    consul_agent_acl.add_token(sentinel, {"service_write": ["tok"], "service_read": ["*"], "node_read": True})
    with FaultProxy(consul_agent_acl.port) as tap:
        app = start_app("tok")
        sc = start_sidecar(
            app.port,
            "--name",
            "tok",
            "--registry",
            "consul",
            "--consul-addr",
            f"127.0.0.1:{tap.port}",
            "--log-level",
            "debug",
            env={"CONSUL_HTTP_TOKEN": sentinel},
        )
        seen: list[bytes] = []
        seen += [http("GET", f"{sc.outbound}/tok/x")[2], http("GET", f"{sc.outbound}/nosuch/x")[2]]
        seen += [http("GET", f"{sc.admin}{p}")[2] for p in ("/status", "/metrics", "/ready")]
        consul_agent_acl.remove_token(sentinel)  # now every call is denied: 403s get logged
        time.sleep(2)
        seen += [http("GET", f"{sc.outbound}/other/x")[2], http("GET", f"{sc.admin}/status")[2]]
        consul_agent_acl.set_fault("error500")
        time.sleep(1.5)
        seen += [http("GET", f"{sc.outbound}/again/x")[2], http("GET", f"{sc.admin}/status")[2]]
        consul_agent_acl.set_fault("none")
        sc.signal(15)
        sc.wait(20)
        out = sc.output()
        traffic = bytes(tap.sent_upstream)
    assert sentinel not in out, "the token is in the sidecar's output"
    for body in seen:
        assert sentinel.encode() not in body, body[:300]
    assert sentinel.encode() in traffic, "the token was never sent: the test proves nothing"
    for line in traffic.split(b"\r\n"):
        if sentinel.encode() in line:
            assert line.lower().startswith(b"x-consul-token:"), (
                f"token outside X-Consul-Token: {line[:200]!r}"
            )


# -- aiohttp's C parser -------------------------------------------------------------------


def test_refuses_to_start_without_the_c_parser(procs):
    sc = Sidecar(free_port(), env={"AIOHTTP_NO_EXTENSIONS": "1"})
    procs.append(sc)
    wait_for(lambda: sc.popen.poll() is not None, 15, what="the sidecar to refuse to start")
    out = sc.output()
    assert sc.popen.returncode != 0, out[-1500:]
    assert "AIOHTTP_NO_EXTENSIONS" in out, out[-1500:]
    assert "Traceback" not in out
