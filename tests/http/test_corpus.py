"""The HTTP correctness corpus of issue 5: exact bytes in, status / close / reached-the-app out.

Every case runs against both listeners of one sidecar:
  inbound   client -> inbound -> app
  outbound  client -> outbound (Host: corpus) -> the same sidecar's inbound -> app
The app is tests/apps/raw_app.py, which records every request head it receives, so a
case can assert that nothing reached it. Run alone with:  pytest -m corpus
"""

from __future__ import annotations

import email.utils
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.faultproxy import Exchange, RawApp, RawConn, exchange
from tests.helpers import Proc, Sidecar

pytestmark = pytest.mark.corpus

SERVICE = "corpus"
BODY_LIMIT = 1024 * 1024  # MICRO_SIDECAR_MAX_REQUEST_BODY for the corpus sidecar
LISTENERS = ("inbound", "outbound")


@dataclass
class Stack:
    app: RawApp
    sidecar: Sidecar

    def port(self, listener: str) -> int:
        return self.sidecar.inbound_port if listener == "inbound" else self.sidecar.outbound_port

    def subst(self, listener: str) -> dict[str, str]:
        if listener == "inbound":
            host = f"127.0.0.1:{self.sidecar.inbound_port}"
            return {"host": host, "authority": host, "pfx": ""}
        return {"host": SERVICE, "authority": f"{SERVICE}:80", "pfx": f"/{SERVICE}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    started: list[Proc] = []
    try:
        app = RawApp(tmp / "seen.jsonl")
        started.append(app)
        app.wait_up()
        sidecar = Sidecar(
            app.port,
            "--name",
            SERVICE,
            "--health-path",
            "",
            "--request-timeout",
            "3",
            registry_path=tmp / "registry.sqlite3",
            env={"MICRO_SIDECAR_MAX_REQUEST_BODY": str(BODY_LIMIT)},
        )
        started.append(sidecar)
        sidecar.wait_ready()
        yield Stack(app, sidecar)
        # whatever the corpus sent (in whatever order, or a selection of it), the sidecar
        # answered without logging a traceback
        out = sidecar.output()
        assert "Traceback" not in out, out[out.index("Traceback") - 300 :][:1500]
    finally:
        for proc in reversed(started):
            proc.stop()


# -- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes  # {host}, {authority} and {pfx} are filled in per listener
    status: tuple[int, ...]  # acceptable statuses
    close: bool | None  # True: must close after the answer; False: must stay open; None: either
    reach: bool | None  # False: nothing may reach the app; True: the request must reach it
    check: Callable[[Exchange, list[dict]], None] | None = None
    method: str = "GET"


def fill(data: bytes, values: dict[str, str]) -> bytes:
    for key, value in values.items():
        data = data.replace(b"{" + key.encode() + b"}", value.encode())
    return data


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"


def post(headers: bytes, body: bytes = b"", smuggle: bool = True) -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: {host}\r\n" + headers + b"\r\n" + body + (SMUGGLED if smuggle else b"")


def get(headers: bytes = b"", target: bytes = b"/x", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\nHost: {host}\r\n" + headers + b"\r\n"


def app_headers(seen: list[dict]) -> dict[str, list[str]]:
    assert seen, "the request did not reach the app"
    out: dict[str, list[str]] = {}
    for key, value in seen[-1]["headers"]:
        out.setdefault(key.lower(), []).append(value)
    return out


def no_interim(ex: Exchange, seen: list[dict]) -> None:
    assert ex.first.interim == [], f"a 100 Continue was sent before the rejection: {ex.first.interim}"


def underscore_dropped(ex: Exchange, seen: list[dict]) -> None:
    got = app_headers(seen)
    assert not [k for k in got if "_" in k], f"header names with '_' reached the app: {sorted(got)}"
    assert got.get("x-normal") == ["yes"]


def hop_by_hop_request(ex: Exchange, seen: list[dict]) -> None:
    got = app_headers(seen)
    for gone in ("x-listed", "x-listed-too", "keep-alive", "proxy-connection", "upgrade", "te", "trailer"):
        assert gone not in got, f"hop-by-hop {gone!r} reached the app"
    for value in got.get("connection", []):
        assert "x-listed" not in value.lower(), f"the caller's Connection header reached the app: {value}"
    assert got.get("x-end-to-end") == ["kept"]


def hop_by_hop_response(ex: Exchange, seen: list[dict]) -> None:
    names = ex.first.header_names()
    for gone in ("x-resp-hop", "keep-alive", "proxy-connection", "upgrade"):
        assert gone not in names, f"hop-by-hop response header {gone!r} reached the client"
    assert ex.first.header("X-End") == "ok"
    assert ex.first.body == b"hop\n" and ex.first.complete


def forwarded_trusted(ex: Exchange, seen: list[dict]) -> None:
    got = app_headers(seen)
    assert len(got.get("x-forwarded-for", [])) == 1, f"X-Forwarded-For: {got.get('x-forwarded-for')}"
    assert got["x-forwarded-for"][0].split(",")[-1].strip() == "127.0.0.1"
    # the last hop's own scheme: https when it was sidecar to sidecar over mutual TLS (the
    # inbound sidecar then also sets X-Forwarded-Client-Cert), never the caller's claim
    scheme = "https" if got.get("x-forwarded-client-cert") else "http"
    assert got.get("x-forwarded-proto") == [scheme], f"X-Forwarded-Proto: {got.get('x-forwarded-proto')}"
    spoofed = [v for v in got.get("x-forwarded-host", []) if "evil.example" in v]
    assert not spoofed, "the caller's X-Forwarded-Host reached the app"
    assert len(got.get("x-forwarded-host", [])) <= 1


def forwarded_other_dropped(ex: Exchange, seen: list[dict]) -> None:
    got = app_headers(seen)
    for name, spoof in (
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-user", "root"),
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6;proto=https"),
    ):
        assert spoof not in got.get(name, []), f"the caller's {name}: {spoof} reached the app unchanged"


def internal_dropped(ex: Exchange, seen: list[dict]) -> None:
    got = app_headers(seen)
    # X-Sidecar-Caller is the inbound sidecar's own, for a verified mutual TLS caller only
    internal = [k for k in got if k.startswith("x-sidecar-") and k != "x-sidecar-caller"]
    assert not internal, f"internal headers reached the app: {sorted(got)}"
    if "x-sidecar-caller" in got:
        assert got.get("x-forwarded-client-cert"), "a caller name without a verified certificate"
        assert got["x-sidecar-caller"] not in (["fake"], ["1"], ["yes"])


def absolute_form_path(ex: Exchange, seen: list[dict]) -> None:
    assert seen and seen[-1]["target"] == "/abs?q=1", seen[-1:] or "nothing reached the app"


def normalised_path(ex: Exchange, seen: list[dict]) -> None:
    assert seen and seen[-1]["target"].endswith("/x"), seen[-1:] or "nothing reached the app"
    assert " " not in seen[-1]["target"]


BIG = b"a" * 8000
CHUNKED = b"Transfer-Encoding: chunked\r\n"
HUGE = 1024**4


def bad(name: str, data: bytes, *status: int, check: Callable | None = None) -> Case:
    """Rejected (400 unless told), connection closed, nothing reached the app."""
    return Case(name, data, status or (400,), True, False, check)


def good(name: str, data: bytes, check: Callable | None = None) -> Case:
    """Forwarded: 200 from the app, which got the request (with `check` on what it saw)."""
    return Case(name, data, (200,), None, True, check)


def big_post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST {pfx}/x HTTP/1.1\r\nHost: {host}\r\n" + headers + b"\r\n" + body


CASES: list[Case] = [
    # -- message framing: rejected (400/501), closed, nothing forwarded
    bad("cl_and_te", post(b"Content-Length: 5\r\n" + CHUNKED, b"0\r\n\r\n"), 400, 501),
    bad("te_and_cl", post(CHUNKED + b"Content-Length: 5\r\n", b"0\r\n\r\n"), 400, 501),
    bad("cl_duplicate_differing", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")),
    bad("cl_duplicate_same", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello")),
    bad("cl_list", post(b"Content-Length: 5, 5\r\n", b"hello")),
    bad("cl_negative", post(b"Content-Length: -1\r\n")),
    bad("cl_plus_sign", post(b"Content-Length: +5\r\n", b"hello")),
    bad("cl_hex", post(b"Content-Length: 0x5\r\n", b"hello")),
    bad("cl_inner_space", post(b"Content-Length: 1 2\r\n", b"hello world!")),
    bad("cl_empty", post(b"Content-Length: \r\n")),
    bad("cl_overflow", post(b"Content-Length: 99999999999999999999999999\r\n", b"x"), 400, 413),
    bad("te_gzip_chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 400, 501),
    bad("te_chunked_gzip", post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"), 400, 501),
    bad("te_identity", post(b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n"), 400, 501),
    bad("te_chunked_twice", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"), 400, 501),
    bad("te_two_headers", post(b"Transfer-Encoding: gzip\r\n" + CHUNKED, b"0\r\n\r\n"), 400, 501),
    bad("te_xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), 400, 501),
    bad(
        "te_on_http10",
        b"POST {pfx}/x HTTP/1.0\r\nHost: {host}\r\n" + CHUNKED + b"\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        501,
    ),
    bad("chunk_size_not_hex", post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n")),
    bad("chunk_size_negative", post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n")),
    bad("chunk_size_0x", post(CHUNKED, b"0x5\r\nhello\r\n0\r\n\r\n")),
    bad("chunk_size_overflow", post(CHUNKED, b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), 400, 413),
    bad("chunk_overrun", post(CHUNKED, b"3\r\nhello\r\n0\r\n\r\n")),
    bad("chunk_bare_lf", post(CHUNKED, b"5\nhello\n0\n\n")),
    # -- header syntax: 400
    bad("obs_fold", get(b"X-A: 1\r\n  folded\r\n")),
    bad("obs_fold_tab", get(b"X-A: 1\r\n\tfolded\r\n")),
    bad("bare_cr_in_value", get(b"X-A: a\rb\r\n")),
    bad("bare_cr_line_end", get(b"X-A: 1\rX-B: 2\r\n")),
    bad("bare_lf_header_line", get(b"X-A: 1\nX-B: 2\r\n")),
    bad("bare_lf_request_line", b"GET /x HTTP/1.1\nHost: {host}\r\n\r\n"),
    bad("nul_in_value", get(b"X-A: a\x00b\r\n")),
    bad("ctl_in_value", get(b"X-A: a\x01b\r\n")),
    bad("del_in_value", get(b"X-A: a\x7fb\r\n")),
    bad("ctl_in_name", get(b"X-\x01A: 1\r\n")),
    bad("space_before_colon", get(b"X-A : 1\r\n")),
    bad("tab_before_colon", get(b"X-A\t: 1\r\n")),
    bad("space_in_name", get(b"X A: 1\r\n")),
    bad("empty_name", get(b": 1\r\n")),
    bad("no_colon", get(b"X-A 1\r\n")),
    # RFC 9112 section 3: a recipient MAY parse the request line on whitespace boundaries.
    # llhttp (and nginx) do; the request is forwarded re-serialised with single spaces,
    # so no other hop can read it differently.
    good("request_line_double_space", b"GET  {pfx}/x HTTP/1.1\r\nHost: {host}\r\n\r\n", normalised_path),
    # -- limits: 431, 414, 413 (the corpus sidecar's body limit is BODY_LIMIT)
    bad("too_many_headers", get(b"".join(b"X-H%d: 1\r\n" % i for i in range(300))), 431),
    bad("header_block_too_large", get(b"".join(b"X-H%d: %s\r\n" % (i, BIG) for i in range(16))), 431),
    bad("one_header_too_large", get(b"X-Big: " + b"b" * 100_000 + b"\r\n"), 431),
    bad("request_line_too_long", get(target=b"/" + b"p" * 100_000), 414),
    bad(
        "body_over_limit_cl",
        big_post(b"Content-Length: %d\r\n" % (BODY_LIMIT + 1), b"z" * (BODY_LIMIT + 1)),
        413,
    ),
    bad("body_over_limit_huge_cl", big_post(b"Content-Length: %d\r\n" % HUGE, b"zz"), 413),
    Case(
        "body_over_limit_chunked",
        big_post(CHUNKED, (b"10000\r\n" + b"c" * 0x10000 + b"\r\n") * 20 + b"0\r\n\r\n"),
        (413,),
        True,
        None,  # a streaming proxy may have passed the start of the body on already
    ),
    bad(
        "expect_100_too_large",
        big_post(b"Content-Length: %d\r\nExpect: 100-continue\r\n" % HUGE),
        413,
        check=no_interim,
    ),
    # -- header rewriting: the request reaches the app, with these headers fixed
    good(
        "underscore_dropped", get(b"X_User: admin\r\nX-Normal: yes\r\nAuth_Token: t\r\n"), underscore_dropped
    ),
    good(
        "hop_by_hop_request",
        get(
            b"Connection: keep-alive, X-Listed, X-Listed-Too\r\nX-Listed: 1\r\nX-Listed-Too: 2\r\n"
            b"Keep-Alive: timeout=99\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTE: gzip\r\n"
            b"Trailer: X-T\r\nX-End-To-End: kept\r\n"
        ),
        hop_by_hop_request,
    ),
    good("hop_by_hop_response", get(target=b"/hop-response"), hop_by_hop_response),
    good(
        "x_forwarded_from_caller",
        get(
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: evil.example\r\n"
        ),
        forwarded_trusted,
    ),
    good(
        "x_forwarded_other_from_caller",
        get(
            b"X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nX-Forwarded-User: root\r\n"
            b"X-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https\r\n"
        ),
        forwarded_other_dropped,
    ),
    good(
        "sidecar_internal_headers",
        get(b"X-Sidecar-Error: fake\r\nX-Sidecar-Hop: 1\r\nx-sidecar-trust: yes\r\n"),
        internal_dropped,
    ),
    # -- host, target, method, version
    bad("missing_host", b"GET {pfx}/x HTTP/1.1\r\nX-A: 1\r\n\r\n"),
    bad("duplicate_host", get(b"Host: other.example\r\n")),
    bad("host_with_space", b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n"),
    bad("absolute_form_disagrees", b"GET http://mismatch-svc/x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    good(
        "absolute_form_agrees",
        b"GET http://{host}/abs?q=1 HTTP/1.1\r\nHost: {host}\r\n\r\n",
        absolute_form_path,
    ),
    good("http10_without_host", b"GET {pfx}/x HTTP/1.0\r\n\r\n"),
    bad("connect", b"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n", 405),
    bad("http09", b"GET /x\r\n\r\n", 505),
    bad("version_0_9", get(version=b"HTTP/0.9"), 505),
    bad("version_2_0", get(version=b"HTTP/2.0"), 505),
    bad("version_3_0", get(version=b"HTTP/3.0"), 505),
    bad("version_malformed", get(version=b"HTTP/1.1x")),
    bad("version_lowercase", get(version=b"http/1.1")),
    bad("fragment_in_target", get(target=b"/x#frag")),
]


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_request_case(stack, listener, case):
    before = len(stack.app.seen())
    ex = exchange(stack.port(listener), fill(case.data, stack.subst(listener)), method=case.method, timeout=3)
    time.sleep(0.05)
    seen = stack.app.seen()[before:]
    got = f"{case.name} via {listener}: {ex.describe()}; app saw {[s['target'] for s in seen]}"
    assert ex.first.status in case.status, f"expected {case.status}, got {got}"
    if case.close is True:
        assert ex.closed, f"the connection must be closed: {got}"
    if case.close is False:
        assert not ex.closed, f"the connection must stay open: {got}"
    if case.reach is False:
        assert not seen, f"nothing may reach the app: {got}"
    if case.reach is True:
        assert seen, f"the request must reach the app: {got}"
    if case.check is not None:
        case.check(ex, seen)


# -- pipelining, Expect, responses from the app, WebSocket --------------------------------


@pytest.mark.parametrize("listener", LISTENERS)
def test_pipelined_requests_answered_in_order(stack, listener):
    v = stack.subst(listener)
    data = fill(
        b"GET /p1 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        b"POST /p2 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /p3 HTTP/1.1\r\nHost: {host}\r\n\r\n",
        v,
    )
    ex = exchange(stack.port(listener), data, responses=3)
    assert [r.status for r in ex.responses] == [200, 200, 200], ex.describe()
    targets = [json.loads(r.body)["target"] for r in ex.responses]
    assert targets == ["/p1", "/p2", "/p3"]
    assert json.loads(ex.responses[1].body)["body_len"] == 3
    assert not ex.closed, "a keep-alive connection was closed after good requests"


@pytest.mark.parametrize("listener", LISTENERS)
def test_connection_closed_after_an_error_in_a_pipeline(stack, listener):
    """A request answered on a connection, then a bad one pipelined with a good one: 400,
    closed, and neither the bad request nor anything after it reaches the app.

    (When the good request travels in the same segment as the bad one, llhttp rejects
    the whole segment and only the 400 comes back; nothing is forwarded either way.)"""
    before = len(stack.app.seen())
    v = stack.subst(listener)
    with RawConn(stack.port(listener)) as conn:
        conn.send(fill(b"GET /ok1 HTTP/1.1\r\nHost: {host}\r\n\r\n", v))
        first = conn.read_response("GET")
        conn.send(
            fill(
                b"GET /bad HTTP/1.1\r\nHost: {host}\r\nX-A : 1\r\n\r\n"
                b"GET /ok3 HTTP/1.1\r\nHost: {host}\r\n\r\n",
                v,
            )
        )
        second = conn.read_response("GET")
        closed = conn.wait_closed(2)
    seen = [s["target"] for s in stack.app.seen()[before:]]
    assert first is not None and first.status == 200
    assert second is not None and second.status == 400
    assert closed, "the connection must be closed after the 400"
    assert [t.rsplit("/", 1)[-1] for t in seen] == ["ok1"], f"app saw {seen}"


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_streamed_body_is_chunked_for_http11_and_ends_with_the_close_for_http10(stack, listener):
    """RFC 9112 section 6: an HTTP/1.0 client cannot read chunked; a body of unknown length
    reaches it delimited by the close, with `Connection: close`."""
    v = stack.subst(listener)
    modern = exchange(stack.port(listener), fill(get(target=b"/stream"), v))
    assert modern.first.status == 200 and modern.first.complete, modern.describe()
    assert (modern.first.header("Transfer-Encoding") or "").lower() == "chunked"
    assert modern.first.body == b"hello world"
    assert not modern.closed, "a chunked answer keeps the connection"
    old = exchange(stack.port(listener), fill(get(target=b"/stream", version=b"HTTP/1.0"), v))
    assert old.first.status == 200 and old.first.body == b"hello world", old.describe()
    assert old.first.header("Transfer-Encoding") is None and old.first.header("Content-Length") is None
    assert (old.first.header("Connection") or "").lower() == "close" and old.closed


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(stack, listener):
    with RawConn(stack.port(listener)) as conn:
        conn.send(fill(get(target=b"/half"), stack.subst(listener)))
        conn.sock.shutdown(socket.SHUT_WR)
        resp = conn.read_response("GET")
        closed = conn.wait_closed(2)
    assert resp is not None and resp.status == 200 and resp.complete, resp
    assert json.loads(resp.body)["target"] == "/half"
    assert closed, "the sidecar closes once the half-closed client has its answer"


@pytest.mark.parametrize("listener", LISTENERS)
def test_the_sidecars_own_answers_carry_a_date(stack, listener):
    ex = exchange(stack.port(listener), fill(get(target=b"/x#fragment"), stack.subst(listener)))
    assert ex.first.status == 400 and ex.first.header("X-Sidecar-Error") == "bad_request", ex.describe()
    date = ex.first.header("Date") or ""
    assert email.utils.parsedate_to_datetime(date).tzinfo is not None, date


@pytest.mark.parametrize("listener", LISTENERS)
def test_expect_100_continue(stack, listener):
    v = stack.subst(listener)
    with RawConn(stack.port(listener)) as conn:
        conn.send(
            fill(b"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n", v)
        )
        conn.sock.settimeout(3)
        interim = conn.sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 "), f"expected 100 Continue before the body, got {interim!r}"
        conn.buf = interim.partition(b"\r\n\r\n")[2]
        conn.send(b"hello")
        resp = conn.read_response()
    assert resp is not None and resp.status == 200, resp
    seen = json.loads(resp.body)
    assert seen["body_len"] == 5


def app_response_ok(ex: Exchange, clean_502_only: bool, folded_allowed: bool = False) -> str | None:
    """None when the caller got a 502, or (headers already sent) a visibly broken response."""
    first = ex.first
    if first.status == 502:
        return None
    folded = first.header("X-Folded") or ""
    if folded_allowed and first.status == 200 and first.complete and folded.split() == ["a", "b"]:
        # RFC 9112 section 5.2: a proxy MAY replace each obs-fold with spaces instead of a 502.
        return None
    if not clean_502_only and first.status == 200 and not first.complete:
        return None
    if first.status is None and ex.closed:
        return None if not clean_502_only else "no status line, expected 502"
    return f"expected 502{'' if clean_502_only else ' or an aborted response'}: {ex.describe()}"


RESPONSE_CASES = [
    ("bad_header_bytes", "/bad-header-bytes", True),
    ("bad_status_line", "/bad-status", True),
    ("obs_fold", "/obs-fold", True),
    ("te_gzip", "/te-gzip", True),
    ("te_gzip_chunked", "/te-gzip-chunked", True),
    ("cl_and_te", "/cl-te", True),
    ("duplicate_cl", "/dup-cl", True),
    ("huge_header", "/huge-header", True),
    ("close_without_answer", "/close-empty", True),
    ("reset_after_request", "/reset", True),
    ("short_body", "/short-body", False),
    ("chunked_truncated", "/chunked-truncated", False),
]


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(("name", "path", "clean"), RESPONSE_CASES, ids=[c[0] for c in RESPONSE_CASES])
def test_malformed_app_response(stack, listener, name, path, clean):
    data = fill(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: {host}\r\n\r\n", stack.subst(listener))
    ex = exchange(stack.port(listener), data, timeout=8)
    problem = app_response_ok(ex, clean, folded_allowed=name == "obs_fold")
    assert problem is None, f"{name} via {listener}: {problem}"


WS_REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("listener", LISTENERS)
def test_websocket_upgrade_is_tunnelled(stack, listener):
    with RawConn(stack.port(listener)) as conn:
        conn.send(fill(WS_REQUEST, stack.subst(listener)))
        resp = conn.read_response()
        assert resp is not None and resp.status == 101, f"expected 101, got {resp}"
        assert resp.header("Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert (resp.header("Upgrade") or "").lower() == "websocket"
        for payload in (b"\x81\x05hello", b"raw bytes both ways " * 100):
            conn.send(payload)
            got = b""
            deadline = time.monotonic() + 3
            while len(conn.buf) < len(payload) and conn._fill(deadline):
                pass
            got, conn.buf = conn.buf[: len(payload)], conn.buf[len(payload) :]
            assert got == payload


@pytest.mark.parametrize("listener", LISTENERS)
def test_websocket_not_switched_unless_the_app_answers_101(stack, listener):
    v = stack.subst(listener)
    refused = WS_REQUEST.replace(b"GET /ws ", b"GET /ws-refuse ")
    follow = b"GET /after HTTP/1.1\r\nHost: {host}\r\n\r\n"
    ex = exchange(stack.port(listener), fill(refused + follow, v), responses=2)
    assert ex.responses and ex.responses[0].status == 403, ex.describe()
    # still HTTP on this connection: the next request gets an ordinary answer
    assert len(ex.responses) == 2 and ex.responses[1].status == 200, ex.describe()
