"""The HTTP/2 raw-frame corpus (hardening): exact frames in, the right error out.

The rule (RFC 9113): malformed or abusive HTTP/2 input ends the connection with a GOAWAY
carrying the right error code (connection errors) or the stream with a RST_STREAM (stream
errors); floods end it with ENHANCE_YOUR_CALM (11). Each case costs bounded time and
memory, never reaches the app (tests/apps/raw_app.py records every request head it gets),
never logs a traceback (checked on the sidecar's output after the module) and never takes
the process down: after every case a normal HTTP/2 request on a new connection, and an
HTTP/1.1 one, still get their 200 (the autouse fixture `serves_after`).

Frames are built with jh2's hyperframe when well-formed and by hand (`raw_frame`) when
not, header blocks with jh2's HPACK encoder; `H2Client` parses the frames coming back.
Cases marked xfail(strict=True) are sidecar defects, described in their reason: the
owner of sidecar/http/h2_server.py removes the mark with the fix. Run alone with
`pytest -m corpus tests/http/test_h2_corpus.py`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest
from jh2.hpack import Decoder, Encoder
from jh2.hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.faultproxy import RawApp, RawConn, exchange
from tests.helpers import Proc, Sidecar

pytestmark = pytest.mark.corpus

SERVICE = "h2corpus"
LIMITED = "h2limited"  # the sidecar started with --h2-max-streams 4
LISTENERS = ("inbound", "outbound")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types, flags and error codes (RFC 9113 sections 6 and 7)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
ENHANCE_YOUR_CALM = 11
CODE_NAMES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    11: "ENHANCE_YOUR_CALM",
}
TYPE_NAMES = ["DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY"]
TYPE_NAMES += ["WINDOW_UPDATE", "CONTINUATION"]

# the sidecar's limits (sidecar/http/h2_core.py, h2_server.py)
MAX_FRAME = 16384
CONTROL_LIMIT = 2000  # non-request frames per 10 s
RESET_LIMIT = 1000  # streams reset before their answer per 10 s
FLOOD = 5000  # frames sent by a flood case: well over both limits
QUICK = 2.0  # seconds within which an abusive connection must be ended


# -- a raw HTTP/2 client --------------------------------------------------------------


def raw_frame(kind: int, flags: int, stream: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A frame by hand (9-byte header: 24-bit length, type, flags, 31-bit stream id), for
    the malformed ones hyperframe refuses to build; `length` may lie about the payload."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def headers(stream: int, block: bytes, end_stream: bool = True, end_headers: bool = True) -> bytes:
    flags = (["END_STREAM"] if end_stream else []) + (["END_HEADERS"] if end_headers else [])
    return HeadersFrame(stream, block, flags=flags).serialize()


def data(stream: int, payload: bytes = b"", end_stream: bool = False) -> bytes:
    return DataFrame(stream, payload, flags=["END_STREAM"] if end_stream else []).serialize()


def split_block(stream: int, block: bytes, end_stream: bool = True, piece: int = MAX_FRAME) -> bytes:
    """A header block larger than one frame: HEADERS then CONTINUATION frames."""
    chunks = [block[i : i + piece] for i in range(0, len(block), piece)] or [b""]
    out = headers(stream, chunks[0], end_stream=end_stream, end_headers=len(chunks) == 1)
    for i, chunk in enumerate(chunks[1:], 2):
        out += ContinuationFrame(stream, chunk, flags=["END_HEADERS"] if i == len(chunks) else []).serialize()
    return out


@dataclass
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes

    @property
    def code(self) -> int:
        """The error code of a GOAWAY or RST_STREAM."""
        if self.type == GOAWAY:
            return int.from_bytes(self.payload[4:8], "big")
        assert self.type == RST_STREAM, self
        return int.from_bytes(self.payload[:4], "big")

    @property
    def last_stream(self) -> int:
        assert self.type == GOAWAY, self
        return int.from_bytes(self.payload[:4], "big") & 0x7FFFFFFF

    def __repr__(self) -> str:
        name = TYPE_NAMES[self.type] if self.type < len(TYPE_NAMES) else f"type{self.type}"
        text = f"{name}(stream={self.stream}, flags={self.flags:#x}"
        if self.type == GOAWAY:
            text += f", last={self.last_stream}, {CODE_NAMES.get(self.code, self.code)}"
        elif self.type == RST_STREAM:
            text += f", {CODE_NAMES.get(self.code, self.code)}"
        return text + ")"


@dataclass
class Answer:
    """How one stream ended: a status (and body), a RST_STREAM, or the connection's GOAWAY."""

    status: int | None = None
    body: bytes = b""
    reset: int | None = None  # RST_STREAM error code
    goaway: int | None = None  # the first GOAWAY's error code
    ended: bool = False  # END_STREAM seen

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(f"status {self.status}{'' if self.ended else ' (not ended)'}")
        if self.reset is not None:
            parts.append(f"RST_STREAM {CODE_NAMES.get(self.reset, self.reset)}")
        if self.goaway is not None:
            parts.append(f"GOAWAY {CODE_NAMES.get(self.goaway, self.goaway)}")
        return ", ".join(parts) or "nothing"


class H2Client:
    """One raw HTTP/2 connection on loopback: exact bytes out, frames parsed back."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.frames: list[Frame] = []
        self.eof = False
        self.reset = False  # the server reset the TCP connection
        self.timed_out = False
        self.sent = 0
        self.send_error: str | None = None
        self.encoder = Encoder()  # one per connection: HPACK's dynamic table
        self._decoder = Decoder()
        self._blocks: dict[int, bytearray] = {}
        self.responses: dict[int, list[dict[str, str]]] = {}  # decoded HEADERS per stream

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> H2Client:
        """The client preface and an empty SETTINGS frame."""
        self.send(PREFACE + SettingsFrame(0).serialize())
        return self

    def block(self, fields: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(fields)

    def send(self, payload: bytes) -> bool:
        try:
            self.sock.sendall(payload)
        except OSError as exc:  # the server closed or reset the connection meanwhile
            self.send_error = repr(exc)
            return False
        self.sent += len(payload)
        return True

    def send_in_background(self, payload: bytes, piece: int = 65536) -> threading.Thread:
        """Send a flood without blocking the reader (the server may stop reading it)."""

        def run() -> None:
            for i in range(0, len(payload), piece):
                if not self.send(payload[i : i + piece]):
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    # -- reading ------------------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """More bytes into the buffer; False at EOF or reset. Raises TimeoutError."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(262144)
        except TimeoutError:
            raise TimeoutError from None
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def _parse(self) -> Frame | None:
        if len(self.buf) < 9:
            return None
        length = int.from_bytes(self.buf[:3], "big")
        if len(self.buf) < 9 + length:
            return None
        stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        frame = Frame(self.buf[3], self.buf[4], stream, bytes(self.buf[9 : 9 + length]))
        del self.buf[: 9 + length]
        self.frames.append(frame)
        if frame.type in (HEADERS, CONTINUATION):
            self._header_fragment(frame)
        return frame

    def _header_fragment(self, frame: Frame) -> None:
        payload = frame.payload
        if frame.type == HEADERS:
            if frame.flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if frame.flags & 0x20:  # PRIORITY
                payload = payload[5:]
        block = self._blocks.setdefault(frame.stream, bytearray())
        block += payload
        if frame.flags & END_HEADERS:
            fields = self._decoder.decode(bytes(self._blocks.pop(frame.stream)), raw=True)
            self.responses.setdefault(frame.stream, []).append(
                {bytes(k).decode("latin-1"): bytes(v).decode("latin-1") for k, v in fields}
            )

    def read_until(self, done: Callable[[Frame], bool], timeout: float = 3.0) -> Frame | None:
        """Frames until one for which `done` is true (returned); None at the close or the
        timeout (then `timed_out`)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                frame = self._parse()
                if frame is None:
                    if not self._fill(deadline):
                        return None
                    continue
                if done(frame):
                    return frame
        except TimeoutError:
            self.timed_out = True
            return None

    def wait_closed(self, timeout: float = QUICK) -> bool:
        """Read (and keep) every frame until the server closes; True when it did."""
        self.read_until(lambda f: False, timeout)
        return self.eof

    def goaway(self, timeout: float = QUICK) -> Frame | None:
        """The first GOAWAY (already read, or read now)."""
        for frame in self.frames:
            if frame.type == GOAWAY:
                return frame
        return self.read_until(lambda f: f.type == GOAWAY, timeout)

    @property
    def goaways(self) -> list[Frame]:
        return [f for f in self.frames if f.type == GOAWAY]

    def count(self, kind: int, flags: int | None = None) -> int:
        return sum(1 for f in self.frames if f.type == kind and (flags is None or f.flags & flags == flags))

    def answer(self, stream: int, timeout: float = 3.0) -> Answer:
        """Read until `stream` ends (END_STREAM or RST_STREAM) or the connection does."""

        def done(f: Frame) -> bool:
            if f.type == GOAWAY:
                return True
            return f.stream == stream and (
                f.type == RST_STREAM or (f.type in (DATA, HEADERS) and bool(f.flags & END_STREAM))
            )

        self.read_until(done, timeout)
        got = Answer()
        for f in self.frames:
            if f.type == GOAWAY and got.goaway is None:
                got.goaway = f.code
            if f.stream != stream:
                continue
            if f.type == RST_STREAM:
                got.reset = f.code
            elif f.type == DATA:
                got.body += f.payload
            if f.type in (DATA, HEADERS) and f.flags & END_STREAM:
                got.ended = True
        heads = self.responses.get(stream) or [{}]
        status = heads[0].get(":status")
        got.status = int(status) if status and status.isdigit() else None
        return got

    def describe(self) -> str:
        counts: dict[str, int] = {}
        shown: list[str] = []
        for f in self.frames:
            if f.type in (SETTINGS, WINDOW_UPDATE, PING):
                name = TYPE_NAMES[f.type] + ("+ACK" if f.flags & ACK and f.type != WINDOW_UPDATE else "")
                counts[name] = counts.get(name, 0) + 1
            elif len(shown) < 12:
                shown.append(repr(f))
        state = "reset" if self.reset else "closed" if self.eof else "timed out" if self.timed_out else "open"
        return f"frames {shown} {counts}, connection {state}, sent {self.sent} bytes"


# -- the stack ------------------------------------------------------------------------


@dataclass
class Stack:
    app: RawApp
    sidecar: Sidecar
    service: str

    def port(self, listener: str) -> int:
        return self.sidecar.inbound_port if listener == "inbound" else self.sidecar.outbound_port

    def authority(self, listener: str) -> str:
        """:authority (and Host): the inbound's own address, or the service called."""
        return f"127.0.0.1:{self.sidecar.inbound_port}" if listener == "inbound" else self.service

    def reached(self, mark: str) -> list[dict]:
        """The request heads the app received that carry `mark` (in a path or header)."""
        return [seen for seen in self.app.seen() if mark in json.dumps(seen)]


def start_sidecar(app: RawApp, name: str, registry: Path, *args: str) -> Sidecar:
    return Sidecar(
        app.port,
        "--name",
        name,
        "--health-path",
        "",
        "--request-timeout",
        "3",
        *args,
        registry_path=registry,
    )


def no_traceback(sidecar: Sidecar) -> None:
    out = sidecar.output()
    assert "Traceback" not in out, out[max(0, out.index("Traceback") - 300) :][:2000]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("h2corpus")
    started: list[Proc] = []
    try:
        app = RawApp(tmp / "seen.jsonl")
        started.append(app)
        app.wait_up()
        sidecar = start_sidecar(app, SERVICE, tmp / "registry.sqlite3")
        started.append(sidecar)
        sidecar.wait_ready()
        yield Stack(app, sidecar, SERVICE)
        # whatever the corpus sent, the sidecar answered it without a traceback
        no_traceback(sidecar)
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.fixture(scope="module")
def limited(stack, tmp_path_factory):
    """A second sidecar for the same app, allowing 4 concurrent streams per connection."""
    tmp = tmp_path_factory.mktemp("h2limited")
    sidecar = start_sidecar(stack.app, LIMITED, tmp / "registry.sqlite3", "--h2-max-streams", "4")
    try:
        sidecar.wait_ready()
        yield Stack(stack.app, sidecar, LIMITED)
        no_traceback(sidecar)
    finally:
        sidecar.stop()


def fresh_request(target: Stack, listener: str, path: str) -> Answer:
    with H2Client(target.port(listener)) as conn:
        conn.start()
        conn.send(headers(1, conn.block(request_fields(target, listener, path))))
        return conn.answer(1)


def assert_serves(target: Stack, listener: str) -> None:
    """The process is up and a new connection gets its 200, over HTTP/2 and HTTP/1.1."""
    assert target.sidecar.popen.poll() is None, f"the sidecar exited:\n{target.sidecar.output()[-3000:]}"
    answer = fresh_request(target, listener, "/after-h2")
    assert answer.status == 200 and answer.ended, f"a normal HTTP/2 request via {listener} got {answer}"
    request = f"GET /after-h1 HTTP/1.1\r\nHost: {target.authority(listener)}\r\n\r\n".encode()
    ex = exchange(target.port(listener), request, close_wait=0.01)
    assert ex.first.status == 200, f"a normal HTTP/1.1 request via {listener} got {ex.describe()}"


@pytest.fixture(autouse=True)
def serves_after(request, stack):
    """After every case (passed, failed or xfailed), the sidecars still serve."""
    yield
    callspec = getattr(request.node, "callspec", None)
    listener = callspec.params.get("listener", "inbound") if callspec else "inbound"
    assert_serves(stack, listener)
    other = request.node.funcargs.get("limited")
    if other is not None:
        assert_serves(other, "inbound")


def new_mark(name: str) -> str:
    return f"h2c-{name}-{uuid.uuid4().hex[:8]}"


def request_fields(
    target: Stack, listener: str, path: str, method: str = "GET", extra: tuple[tuple[bytes, bytes], ...] = ()
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"http"),
        (b":authority", target.authority(listener).encode()),
        (b":path", path.encode()),
        *extra,
    ]


def assert_not_reached(target: Stack, mark: str, got: str) -> None:
    time.sleep(0.1)  # the outbound listener's hop to the inbound one
    seen = target.reached(mark)
    assert not seen, f"nothing may reach the app, it saw {[(s['method'], s['target']) for s in seen]}: {got}"


def assert_conn_error(conn: H2Client, codes: tuple[int, ...], within: float = QUICK) -> Frame:
    """A GOAWAY with one of `codes` within `within` seconds, then the close."""
    start = time.monotonic()
    goaway = conn.goaway(within)
    took = time.monotonic() - start
    assert goaway is not None, f"expected a GOAWAY {[CODE_NAMES[c] for c in codes]}: {conn.describe()}"
    assert goaway.code in codes, f"expected GOAWAY {[CODE_NAMES[c] for c in codes]}: {conn.describe()}"
    assert took < within, f"the GOAWAY took {took:.2f}s"
    assert conn.wait_closed(), f"the connection must be closed after the GOAWAY: {conn.describe()}"
    return goaway


# -- the preface ------------------------------------------------------------------------


BAD_PREFACES = {
    # not the preface: the listener takes it for HTTP/1.1 (a 4xx, closed) or HTTP/2 (GOAWAY)
    "whole": [b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + SettingsFrame(0).serialize()],
    # a preface that goes wrong after its first bytes (HTTP/2 was chosen on them)
    "split": [b"PRI * HTTP/2.0\r\n\r\nS", b"X\r\n\r\n" + SettingsFrame(0).serialize()],
}


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("pieces", list(BAD_PREFACES.values()), ids=list(BAD_PREFACES))
def test_bad_preface(stack, listener, pieces):
    with H2Client(stack.port(listener)) as conn:
        for piece in pieces:
            conn.send(piece)
            time.sleep(0.1)
        closed = conn.wait_closed()
        answer = bytes(conn.buf)
        goaway = conn.goaways[0] if conn.goaways else None
        got = f"{conn.describe()}, bytes {answer[:60]!r}"
    http1_error = answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5")
    assert http1_error or (goaway is not None and goaway.code == PROTOCOL_ERROR), got
    assert closed, f"the connection must be closed: {got}"


NOT_SETTINGS = {
    # what a confused HTTP/1.1 client sends after the preface: "GET" reads as a frame
    # length of 4.6 MB, which jh2 waits for before it checks anything
    "http1_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage": b"\xff" * 64,
    "ping_first": PingFrame(0, opaque_data=b"12345678").serialize(),
}
NOT_SETTINGS_DEFECT = (
    "RFC 9113 section 3.4: the preface must be followed by SETTINGS, else connection error "
    "PROTOCOL_ERROR. jh2 does not check the first frame's type and the sidecar does not either: "
    "a PING first is answered and the request after it served; garbage or HTTP/1.1 text (read as a "
    "frame header announcing up to 16 MiB) gets no answer at all and the connection is held, its "
    "bytes buffered, until the idle timeout (--idle-timeout, 75 s by default) sends GOAWAY NO_ERROR. "
    "Repro: send PREFACE + b'\\xff' * 64, nothing comes back."
)


@pytest.mark.parametrize("after", list(NOT_SETTINGS.values()), ids=list(NOT_SETTINGS))
def test_preface_not_followed_by_settings(stack, after):
    mark = new_mark("not-settings")
    with H2Client(stack.port("inbound")) as conn:
        conn.send(PREFACE + after + headers(1, conn.block(request_fields(stack, "inbound", f"/{mark}"))))
        goaway = conn.goaway(1.0)
        got = conn.describe()
        closed = conn.eof
    assert_not_reached(stack, mark, got)
    assert closed or (goaway is not None and goaway.code == PROTOCOL_ERROR), got


# -- header blocks ----------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderCase:
    """A request header block the sidecar must refuse: a RST_STREAM or GOAWAY with one of
    `codes`, or else one of `statuses` from the sidecar itself; never forwarded."""

    name: str
    fields: tuple[tuple[bytes, bytes], ...]  # {authority} and {mark} are filled in
    codes: tuple[int, ...] = (PROTOCOL_ERROR,)
    statuses: tuple[int, ...] = (400,)
    defect: str | None = None  # why it is a sidecar defect: strict xfail on `broken`
    broken: tuple[str, ...] = LISTENERS  # the listeners showing the defect


METHOD = (b":method", b"GET")
SCHEME = (b":scheme", b"http")
AUTHORITY = (b":authority", b"{authority}")
PATH = (b":path", b"/{mark}")
MARK = (b"x-case", b"{mark}")


def case(
    name: str, *fields: tuple[bytes, bytes], defect: str | None = None, broken: tuple[str, ...] = LISTENERS
) -> HeaderCase:
    return HeaderCase(name, fields, defect=defect, broken=broken)


NAME_RULE = (
    "RFC 9113 section 8.2.1: a field name must not contain 0x00-0x20, 0x41-0x5a, 0x7f-0xff or a "
    "colon, else the request is malformed (stream error PROTOCOL_ERROR, never forwarded). jh2 "
    "checks only upper case (and empty names); the sidecar passes the name on to the app's "
    "HTTP/1.1 head as it is"
)
VALUE_RULE = (
    "RFC 9113 section 8.2.1: a field value must not contain NUL, CR or LF. CR and LF are caught "
    "(400, client.request_head), NUL is not: the app got the value with the NUL in it"
)
CTL_RULE = (
    "the HTTP/1.1 listener refuses a control character in a header value (400, test_corpus "
    "ctl_in_value; RFC 9110 section 5.5), HTTP/2 lets it through to the app: the same request "
    "bypasses the hardening by speaking HTTP/2"
)
PATH_RULE = (
    "RFC 9113 section 8.3.1: :path is the path and query of the target URI; the sidecar passes "
    "any :path starting with '/' into the app's request line as it is"
)
METHOD_RULE = (
    "RFC 9110 section 9.1: a method is a token; a :method with whitespace is written into the "
    "app's HTTP/1.1 request line as it is, so the app reads another target than the sidecar "
    "routed: ':method: GET /admin' + ':path: /x' reaches the app as 'GET /admin /x HTTP/1.1' "
    "(target /admin)"
)
AUTHORITY_RULE = (
    "the HTTP/1.1 listener refuses a Host with a space (400, test_corpus host_with_space), an "
    "HTTP/2 :authority with a space reaches the app as its Host"
)
CONTENT_LENGTH_RULE = (
    "RFC 9113 section 8.1.1: a content-length that differs from the DATA sent (here 5, with "
    "END_STREAM on HEADERS) makes the request malformed and an intermediary must not forward it; "
    "jh2 checks it only when DATA frames come, the sidecar forwards the request (without the "
    "content-length)"
)

HEADER_CASES = [
    # -- pseudo-headers (RFC 9113 section 8.3): jh2 ends the connection, PROTOCOL_ERROR
    case("missing_path", METHOD, SCHEME, AUTHORITY, MARK),
    case("missing_method", SCHEME, AUTHORITY, PATH),
    case("missing_scheme", METHOD, AUTHORITY, PATH),
    case("empty_path", METHOD, SCHEME, AUTHORITY, (b":path", b""), MARK),
    case("pseudo_after_regular", METHOD, SCHEME, AUTHORITY, MARK, PATH),
    case("duplicate_path", METHOD, SCHEME, AUTHORITY, PATH, PATH),
    case("unknown_pseudo", METHOD, SCHEME, AUTHORITY, PATH, (b":foo", b"1")),
    case("response_pseudo", METHOD, SCHEME, AUTHORITY, PATH, (b":status", b"200")),
    case("host_disagrees", METHOD, SCHEME, AUTHORITY, PATH, (b"host", b"other.example")),
    # -- field names and connection-specific fields (section 8.2)
    case("uppercase_name", METHOD, SCHEME, AUTHORITY, PATH, (b"X-Upper", b"1")),
    case("empty_name", METHOD, SCHEME, AUTHORITY, PATH, (b"", b"1")),
    case("connection_keep_alive", METHOD, SCHEME, AUTHORITY, PATH, (b"connection", b"keep-alive")),
    case("transfer_encoding_chunked", METHOD, SCHEME, AUTHORITY, PATH, (b"transfer-encoding", b"chunked")),
    case("te_gzip", METHOD, SCHEME, AUTHORITY, PATH, (b"te", b"gzip")),
    case("upgrade_header", METHOD, SCHEME, AUTHORITY, PATH, (b"upgrade", b"h2c")),
    case("keep_alive_header", METHOD, SCHEME, AUTHORITY, PATH, (b"keep-alive", b"timeout=5")),
    case("proxy_connection", METHOD, SCHEME, AUTHORITY, PATH, (b"proxy-connection", b"keep-alive")),
    case("value_surrounding_space", METHOD, SCHEME, AUTHORITY, PATH, (b"x-a", b" 1 ")),
    # -- what jh2 lets through and the sidecar answers itself (400), not forwarding
    case("absolute_path", METHOD, SCHEME, AUTHORITY, (b":path", b"http://evil.example/{mark}")),
    case("crlf_in_value", METHOD, SCHEME, AUTHORITY, PATH, (b"x-a", b"1\r\nx-injected: {mark}")),
    case("lf_in_value", METHOD, SCHEME, AUTHORITY, PATH, (b"x-a", b"1\nx-injected: {mark}")),
    case("crlf_in_path", METHOD, SCHEME, AUTHORITY, (b":path", b"/{mark}\r\nx-injected: 1")),
    case("crlf_in_authority", METHOD, SCHEME, (b":authority", b"{authority}\r\nx-i: 1"), PATH),
    # -- what reaches the app although it must not (defects)
    case("colon_in_name", METHOD, SCHEME, AUTHORITY, PATH, (b"x-a:b", b"c"), defect=NAME_RULE),
    case("space_in_name", METHOD, SCHEME, AUTHORITY, PATH, (b"x a", b"c"), defect=NAME_RULE),
    case("nul_in_name", METHOD, SCHEME, AUTHORITY, PATH, (b"x-\x00", b"c"), defect=NAME_RULE),
    case("non_ascii_name", METHOD, SCHEME, AUTHORITY, PATH, (b"x-\xc3\xa9", b"c"), defect=NAME_RULE),
    case("nul_in_value", METHOD, SCHEME, AUTHORITY, PATH, (b"x-a", b"a\x00b"), defect=VALUE_RULE),
    case("ctl_in_value", METHOD, SCHEME, AUTHORITY, PATH, (b"x-a", b"a\x01b"), defect=CTL_RULE),
    case("space_in_path", METHOD, SCHEME, AUTHORITY, (b":path", b"/{mark} HTTP/1.1"), defect=PATH_RULE),
    case("nul_in_path", METHOD, SCHEME, AUTHORITY, (b":path", b"/{mark}\x00x"), defect=PATH_RULE),
    case(
        "fragment_in_path",
        METHOD,
        SCHEME,
        AUTHORITY,
        (b":path", b"/{mark}#frag"),
        defect=PATH_RULE + " (the HTTP/1.1 listener refuses a fragment, test_corpus fragment_in_target, "
        "and so does the outbound one's parse_target: the inbound HTTP/2 side lets it through)",
        broken=("inbound",),
    ),
    case(
        "space_in_method",
        (b":method", b"GET /{mark}"),
        SCHEME,
        AUTHORITY,
        (b":path", b"/x"),
        defect=METHOD_RULE,
    ),
    case(
        "tab_in_method",
        (b":method", b"GET\t/{mark}"),
        SCHEME,
        AUTHORITY,
        (b":path", b"/x"),
        defect=METHOD_RULE,
    ),
    case(
        "content_length_end_stream",
        METHOD,
        SCHEME,
        AUTHORITY,
        PATH,
        (b"content-length", b"5"),
        defect=CONTENT_LENGTH_RULE,
    ),
]
# the space in :authority is checked on the inbound listener only: on the outbound one the
# service named "h2corpus x" does not exist, which is refused for another reason
INBOUND_ONLY = [
    case(
        "space_in_authority",
        METHOD,
        SCHEME,
        (b":authority", b"{authority} x"),
        PATH,
        defect=AUTHORITY_RULE,
    )
]


# Defects this corpus found and that are fixed (h2_server.check_h2_request): their
# cases now pass, and stay as the cases of the rule.
FIXED_RULES = (NAME_RULE, VALUE_RULE, CTL_RULE, PATH_RULE, METHOD_RULE, CONTENT_LENGTH_RULE, AUTHORITY_RULE)


def header_params() -> Iterator[object]:
    for listener in LISTENERS:
        for hc in HEADER_CASES + (INBOUND_ONLY if listener == "inbound" else []):
            fixed = hc.defect is not None and any(hc.defect.startswith(rule) for rule in FIXED_RULES)
            broken = hc.defect is not None and listener in hc.broken and not fixed
            marks = [pytest.mark.xfail(strict=True, reason=hc.defect or "")] if broken else []
            yield pytest.param(hc, listener, id=f"{hc.name}-{listener}", marks=marks)


def fill_fields(fields: tuple[tuple[bytes, bytes], ...], values: dict[str, str]) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in fields:
        for key, text in values.items():
            value = value.replace(b"{" + key.encode() + b"}", text.encode())
        out.append((name, value))
    return out


@pytest.mark.parametrize(("hc", "listener"), list(header_params()))
def test_malformed_header_block(stack, hc, listener):
    mark = new_mark(hc.name)
    fields = fill_fields(hc.fields, {"authority": stack.authority(listener), "mark": mark})
    with H2Client(stack.port(listener)) as conn:
        conn.start()
        conn.send(headers(1, conn.block(fields)))
        answer = conn.answer(1)
        got = f"{hc.name} via {listener}: {answer}; {conn.describe()}"
    assert_not_reached(stack, mark, got)
    if answer.goaway is not None:
        assert answer.goaway in hc.codes, got
    elif answer.reset is not None:
        assert answer.reset in hc.codes, got
    else:
        assert answer.status in hc.statuses, got


SMUGGLE_DEFECT = (
    "request smuggling: a field name with a colon passes jh2 and the hop-by-hop filter and is "
    "written into the app's HTTP/1.1 head as 'transfer-encoding:chunked: x', which a lenient "
    "HTTP/1.1 parser (the raw app) reads as Transfer-Encoding: chunked, so the DATA "
    "'0\\r\\n\\r\\nGET /smuggled...' becomes a second request that reaches the app without the "
    "sidecar's headers. With an answering smuggled request the sidecar's pooled app connection "
    "is desynchronised: the next client's request gets the smuggled request's answer, and every "
    "later one the answer of the request before it. Repro: HEADERS POST with "
    "('transfer-encoding:chunked', 'x') and content-length, DATA '0\\r\\n\\r\\nGET /s HTTP/1.1\\r\\n"
    "Host: x\\r\\n\\r\\n'. See NAME_RULE: rejecting invalid field names fixes it"
)


@pytest.mark.parametrize("listener", LISTENERS)
def test_no_smuggling_through_a_field_name(stack, listener):
    mark = new_mark("smuggle")
    # the smuggled request is /close-empty: the app closes that connection without an
    # answer, so the sidecar's pool is not left out of step for the cases after this one
    body = f"0\r\n\r\nGET /close-empty?{mark}-smuggled HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    extra = ((b"transfer-encoding:chunked", b"x"), (b"content-length", str(len(body)).encode()))
    with H2Client(stack.port(listener)) as conn:
        conn.start()
        fields = request_fields(stack, listener, f"/{mark}", "POST", extra)
        conn.send(headers(1, conn.block(fields), end_stream=False) + data(1, body, end_stream=True))
        answer = conn.answer(1)
        got = f"{answer}; {conn.describe()}"
    time.sleep(0.3)
    seen = [s["target"] for s in stack.reached(mark)]
    assert not [t for t in seen if "smuggled" in t], f"a smuggled request reached the app: {seen}; {got}"
    assert not seen, f"the malformed request reached the app: {seen}; {got}"


def bomb_block(conn: H2Client, target: Stack, listener: str, path: str, references: int) -> bytes:
    """An HPACK bomb: one 4000-byte literal added to the dynamic table (it is the newest
    entry, index 62), then referenced `references` times with one byte each."""
    fields = [*request_fields(target, listener, path), (b"x-bomb", b"a" * 4000)]
    return conn.block(fields) + b"\xbe" * references


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("kind", ["hpack_bomb", "oversized_header_list"])
def test_header_list_over_the_limit(stack, listener, kind):
    """More than MAX_HEADER_LIST (64 KiB) decoded: jh2's DenialOfServiceError, which the
    sidecar sends as ENHANCE_YOUR_CALM, quickly and without forwarding."""
    mark = new_mark(kind)
    with H2Client(stack.port(listener)) as conn:
        conn.start()
        if kind == "hpack_bomb":  # ~4 MB decoded from ~5 KB
            payload = headers(1, bomb_block(conn, stack, listener, f"/{mark}", 1000))
        else:  # 100 distinct 1000-byte fields, in HEADERS + CONTINUATION frames
            many = tuple((b"x-h%d" % i, b"v" * 1000) for i in range(100))
            payload = split_block(1, conn.block(request_fields(stack, listener, f"/{mark}", extra=many)))
        start = time.monotonic()
        conn.send(payload)
        assert_conn_error(conn, (ENHANCE_YOUR_CALM,))
        took = time.monotonic() - start
        got = conn.describe()
    assert took < QUICK, f"{kind} took {took:.2f}s: {got}"
    assert_not_reached(stack, mark, got)


def test_continuation_flood(stack):
    """CVE-2024-27316: HEADERS without END_HEADERS, then CONTINUATION after CONTINUATION.
    jh2 stops at 64 frames (CONTINUATION_BACKLOG): the connection ends with PROTOCOL_ERROR
    long before the flood is read, and the sidecar's memory does not follow the flood."""
    mark = new_mark("continuation")
    rss_before = stack.sidecar.rss_kib()
    frames = 2000  # 32 MiB of CONTINUATION frames of 16 KiB
    with H2Client(stack.port("inbound")) as conn:
        conn.start()
        block = conn.block(request_fields(stack, "inbound", f"/{mark}"))
        filler = ContinuationFrame(1, b"\x00" * MAX_FRAME).serialize()
        flood = headers(1, block, end_headers=False) + filler * frames
        start = time.monotonic()
        sender = conn.send_in_background(flood)
        assert_conn_error(conn, (PROTOCOL_ERROR,))
        took = time.monotonic() - start
        sender.join(5)
        got = conn.describe()
    rss_after = stack.sidecar.rss_kib()
    assert took < QUICK, f"the flood took {took:.2f}s to be refused: {got}"
    assert conn.sent < len(flood) // 2, f"the sidecar read {conn.sent} of {len(flood)} bytes: {got}"
    assert rss_after - rss_before < 6 * 1024, f"VmRSS grew from {rss_before} to {rss_after} KiB"
    assert_not_reached(stack, mark, got)


def test_continuation_flood_of_empty_frames(stack):
    """The same with empty CONTINUATION frames (nothing to buffer, only frames to count)."""
    with H2Client(stack.port("inbound")) as conn:
        conn.start()
        block = conn.block(request_fields(stack, "inbound", "/empty-continuations"))
        empty = ContinuationFrame(1, b"").serialize()
        conn.send_in_background(headers(1, block, end_headers=False) + empty * FLOOD)
        assert_conn_error(conn, (PROTOCOL_ERROR,))


# -- floods ------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", LISTENERS)
def test_rapid_reset(stack, listener):
    """CVE-2023-44487: streams opened and reset at once, thousands of times. Over
    RESET_LIMIT (1000) per 10 s the connection ends with ENHANCE_YOUR_CALM, and at most a
    few of the requests reached the app."""
    mark = new_mark("rapid-reset")
    pairs = 3000
    with H2Client(stack.port(listener)) as conn:
        conn.start()
        fields = request_fields(stack, listener, f"/{mark}")
        flood = b"".join(
            headers(stream, conn.block(fields)) + RstStreamFrame(stream, error_code=CANCEL).serialize()
            for stream in range(1, 2 * pairs, 2)
        )
        start = time.monotonic()
        conn.send_in_background(flood)
        goaway = assert_conn_error(conn, (ENHANCE_YOUR_CALM,))
        took = time.monotonic() - start
        got = conn.describe()
    time.sleep(0.2)
    reached = stack.reached(mark)
    assert took < QUICK, f"took {took:.2f}s: {got}"
    assert goaway.last_stream <= 2 * (RESET_LIMIT + 100), f"{goaway}: {got}"
    assert len(reached) <= 100, f"{len(reached)} of the reset requests reached the app: {got}"


def control_flood(kind: str, conn: H2Client, target: Stack) -> bytes:
    if kind == "settings":
        return SettingsFrame(0).serialize() * FLOOD
    if kind == "ping":
        return b"".join(PingFrame(0, opaque_data=struct.pack(">Q", i)).serialize() for i in range(FLOOD))
    if kind == "priority":
        return b"".join(
            PriorityFrame(2 * i + 1, depends_on=0, stream_weight=15).serialize() for i in range(FLOOD)
        )
    if kind == "unknown_extension_frames":
        return raw_frame(0x20, 0, 0, b"x") * FLOOD
    # frames on a stream open for a request body (whose head may reach the app)
    opened = headers(1, conn.block(request_fields(target, "inbound", "/post", "POST")), end_stream=False)
    if kind == "empty_data":  # CVE-2019-9518
        return opened + data(1) * FLOOD
    assert kind == "window_update_on_stream"
    return opened + WindowUpdateFrame(1, window_increment=1).serialize() * FLOOD


@pytest.mark.parametrize(
    "kind",
    ["settings", "ping", "priority", "empty_data", "window_update_on_stream", "unknown_extension_frames"],
)
def test_control_frame_flood(stack, kind):
    """CVE-2019-9512/9515/9518 and kin: thousands of frames that are not requests. Over
    CONTROL_LIMIT (2000) per 10 s: ENHANCE_YOUR_CALM, quickly."""
    with H2Client(stack.port("inbound")) as conn:
        conn.start()
        conn.send_in_background(control_flood(kind, conn, stack))
        assert_conn_error(conn, (ENHANCE_YOUR_CALM,))


def test_ping_flood_is_not_answered_in_full(stack):
    """The PING ACKs queued for a flood are bounded: the guard closes the connection after
    the read in which the limit was passed (jh2 answers every PING of that read first)."""
    pings = 40000
    with H2Client(stack.port("inbound")) as conn:
        conn.start()
        flood = b"".join(PingFrame(0, opaque_data=struct.pack(">Q", i)).serialize() for i in range(pings))
        conn.send_in_background(flood)
        assert_conn_error(conn, (ENHANCE_YOUR_CALM,))
        acks = conn.count(PING, ACK)
        got = conn.describe()
    assert CONTROL_LIMIT <= acks < pings // 2, f"{acks} PING ACKs for {pings} PINGs: {got}"


# -- streams ----------------------------------------------------------------------------


def test_streams_over_max_concurrent_streams_are_refused(limited):
    """RFC 9113 section 5.1.2: a stream over SETTINGS_MAX_CONCURRENT_STREAMS (4 here) is a
    stream error, REFUSED_STREAM (which a client may retry) or PROTOCOL_ERROR; the streams in
    progress go on and get their answers (the app's /slow path keeps them open)."""
    mark = new_mark("max-streams")
    with H2Client(limited.port("inbound")) as conn:
        conn.start()
        conn.read_until(lambda f: f.type == SETTINGS and not f.flags & ACK)
        conn.send(SettingsFrame(0, flags=["ACK"]).serialize())
        slow = request_fields(limited, "inbound", f"/slow?s=1&{mark}")
        conn.send(b"".join(headers(stream, conn.block(slow)) for stream in (1, 3, 5, 7)))
        time.sleep(0.3)  # the four are in progress
        extra = request_fields(limited, "inbound", f"/{mark}-extra")
        conn.send(headers(9, conn.block(extra)) + headers(11, conn.block(extra)))
        for stream in (9, 11):
            refused = conn.answer(stream)
            got = f"stream {stream}: {refused}; {conn.describe()}"
            assert refused.goaway is None, f"the connection must survive the extra streams: {got}"
            assert refused.reset in (REFUSED_STREAM, PROTOCOL_ERROR), got
        for stream in (1, 3, 5, 7):
            answer = conn.answer(stream, timeout=4)
            assert answer.status == 200 and answer.ended, f"stream {stream}: {answer}; {conn.describe()}"
    assert_not_reached(limited, f"{mark}-extra", got)


class Req(Protocol):
    """The request fields of a frame case: `req("POST")`, `req("GET", "/slow?s=0.5")`."""

    def __call__(self, method: str, path: str = ...) -> list[tuple[bytes, bytes]]: ...


@dataclass(frozen=True)
class FrameCase:
    """Frames after the preface and SETTINGS, and the error they must get."""

    name: str
    build: Callable[[H2Client, Req], bytes]
    codes: tuple[int, ...]
    connection: bool | None  # True: GOAWAY; False: RST_STREAM (`stream`); None: either
    stream: int = 1
    reaches: bool = False  # the request itself is valid and may reach the app


def fc(
    name: str,
    build: Callable[[H2Client, Req], bytes],
    *codes: int,
    connection: bool | None = True,
    reaches: bool = False,
) -> FrameCase:
    return FrameCase(name, build, codes, connection, reaches=reaches)


def post_open(c: H2Client, req: Req, *extra: tuple[bytes, bytes]) -> bytes:
    """HEADERS of a POST whose body is still to come, on stream 1."""
    fields = req("POST") + list(extra)
    return headers(1, c.block(fields), end_stream=False)


def padded_headers(c: H2Client, req: Req) -> bytes:
    block = c.block(req("GET"))
    # PADDED, with a pad length larger than the whole payload
    return raw_frame(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, bytes([255]) + block)


FRAME_CASES = [
    # -- stream states (RFC 9113 section 5.1)
    fc("data_on_idle_stream", lambda c, r: data(1, b"hello", end_stream=True), PROTOCOL_ERROR),
    fc(
        "data_on_even_stream",
        lambda c, r: headers(1, c.block(r("GET"))) + data(2, b"x", True),
        PROTOCOL_ERROR,
    ),
    fc(
        "data_after_end_stream",
        lambda c, r: headers(1, c.block(r("GET", "/slow?s=0.5"))) + data(1, b"late", end_stream=True),
        STREAM_CLOSED,
        connection=None,
        reaches=True,
    ),
    fc("headers_on_even_stream", lambda c, r: headers(2, c.block(r("GET"))), PROTOCOL_ERROR),
    fc("headers_on_stream_0", lambda c, r: raw_frame(HEADERS, 5, 0, c.block(r("GET"))), PROTOCOL_ERROR),
    fc(
        "headers_reusing_a_lower_id",
        lambda c, r: headers(3, c.block(r("GET", "/slow?s=0.5"))) + headers(1, c.block(r("GET"))),
        PROTOCOL_ERROR,
        STREAM_CLOSED,
        reaches=True,  # stream 3 is a valid request
    ),
    fc(
        "rst_stream_on_idle_stream",
        lambda c, r: RstStreamFrame(1, error_code=CANCEL).serialize(),
        PROTOCOL_ERROR,
    ),
    fc(
        "continuation_without_headers",
        lambda c, r: ContinuationFrame(1, c.block(r("GET")), flags=["END_HEADERS"]).serialize(),
        PROTOCOL_ERROR,
    ),
    fc(
        "other_frame_inside_a_header_block",
        lambda c, r: headers(1, c.block(r("GET")), end_headers=False) + PingFrame(0, b"12345678").serialize(),
        PROTOCOL_ERROR,
    ),
    fc(
        "push_promise_from_the_client",
        lambda c, r: (
            post_open(c, r)
            + raw_frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + c.block(r("GET")))
        ),
        PROTOCOL_ERROR,
    ),
    fc(
        "priority_depending_on_itself",
        lambda c, r: PriorityFrame(1, depends_on=1, stream_weight=15).serialize(),
        PROTOCOL_ERROR,
        connection=None,
    ),
    fc("padding_longer_than_the_frame", padded_headers, PROTOCOL_ERROR),
    fc(
        "content_length_exceeded",
        lambda c, r: post_open(c, r, (b"content-length", b"5")) + data(1, b"hello world", end_stream=True),
        PROTOCOL_ERROR,
        connection=None,
    ),
    fc(
        "content_length_not_reached",
        lambda c, r: post_open(c, r, (b"content-length", b"5")) + data(1, b"hi", end_stream=True),
        PROTOCOL_ERROR,
        connection=None,
    ),
    # -- flow control (section 6.9)
    fc(
        "window_update_overflows_the_connection_window",
        lambda c, r: WindowUpdateFrame(0, window_increment=2**31 - 1).serialize(),
        FLOW_CONTROL_ERROR,
    ),
    fc(
        "window_update_overflows_a_stream_window",
        lambda c, r: (
            headers(1, c.block(r("GET", "/slow?s=0.5")))
            + WindowUpdateFrame(1, window_increment=2**31 - 1).serialize()
        ),
        FLOW_CONTROL_ERROR,
        connection=False,
    ),
    fc(
        "window_update_of_zero_on_the_connection",
        lambda c, r: raw_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)),
        PROTOCOL_ERROR,
    ),
    fc(
        "window_update_of_zero_on_a_stream",
        lambda c, r: post_open(c, r) + raw_frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 0)),
        PROTOCOL_ERROR,
        connection=None,
        reaches=True,
    ),
    fc(
        "settings_initial_window_too_large",
        lambda c, r: SettingsFrame(0, settings={4: 2**31}).serialize(),
        FLOW_CONTROL_ERROR,
    ),
    fc(
        "settings_max_frame_size_too_small",
        lambda c, r: raw_frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 100)),
        PROTOCOL_ERROR,
    ),
    # -- frame sizes (section 4.2)
    fc(
        "data_larger_than_max_frame_size",
        lambda c, r: post_open(c, r) + data(1, b"d" * (MAX_FRAME + 1), end_stream=True),
        FRAME_SIZE_ERROR,
    ),
    fc("ping_of_3_bytes", lambda c, r: raw_frame(PING, 0, 0, b"123"), FRAME_SIZE_ERROR),
    fc(
        "settings_of_7_bytes",
        lambda c, r: raw_frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 100) + b"x"),
        FRAME_SIZE_ERROR,
    ),
    fc(
        "rst_stream_of_3_bytes",
        lambda c, r: post_open(c, r) + raw_frame(RST_STREAM, 0, 1, b"\x00\x00\x08"),
        FRAME_SIZE_ERROR,
    ),
    fc(
        "window_update_of_3_bytes",
        lambda c, r: raw_frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"),
        FRAME_SIZE_ERROR,
    ),
    fc(
        "priority_of_4_bytes",
        lambda c, r: raw_frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00"),
        FRAME_SIZE_ERROR,
        connection=None,
    ),
]
SETTINGS_ACK_DEFECT = (
    "RFC 9113 section 6.5: a SETTINGS ACK with a payload is a connection error FRAME_SIZE_ERROR; "
    "the sidecar (jh2) sends GOAWAY PROTOCOL_ERROR. Minor: the connection is ended either way"
)
FRAME_DEFECTS = [
    fc(
        "settings_ack_with_a_payload",
        lambda c, r: raw_frame(SETTINGS, ACK, 0, struct.pack(">HI", 4, 100)),
        FRAME_SIZE_ERROR,
    ),
]


def frame_params() -> Iterator[object]:
    for one in FRAME_CASES:
        yield pytest.param(one, id=one.name)
    for one in FRAME_DEFECTS:
        yield pytest.param(one, id=one.name, marks=pytest.mark.xfail(strict=True, reason=SETTINGS_ACK_DEFECT))


@pytest.mark.parametrize("one", list(frame_params()))
def test_frame_error(stack, one):
    mark = new_mark(one.name)

    def req(method: str, path: str = f"/{mark}") -> list[tuple[bytes, bytes]]:
        if path != f"/{mark}":
            path += f"&{mark}" if "?" in path else f"?{mark}"
        return request_fields(stack, "inbound", path, method)

    with H2Client(stack.port("inbound")) as conn:
        conn.start()
        conn.send(one.build(conn, req))
        answer = conn.answer(one.stream)
        got = f"{one.name}: {answer}; {conn.describe()}"
        if one.connection is True:
            assert answer.goaway in one.codes, f"expected GOAWAY {[CODE_NAMES[c] for c in one.codes]}: {got}"
            assert conn.wait_closed(), f"the connection must be closed: {got}"
        elif one.connection is False:
            assert answer.goaway is None and answer.reset in one.codes, f"expected RST_STREAM: {got}"
            # a stream error: the connection goes on serving
            conn.send(headers(3, conn.block(request_fields(stack, "inbound", "/same-connection"))))
            after = conn.answer(3)
            assert after.status == 200, f"the connection must survive a stream error: {after}; {got}"
        else:
            assert answer.goaway in one.codes or answer.reset in one.codes, got
    if not one.reaches:
        assert_not_reached(stack, mark, got)


GOAWAY_AGREE_DEFECT = (
    "a connection error is reported by two GOAWAYs that disagree: jh2's, with the right code "
    "(FRAME_SIZE_ERROR here), then the sidecar's own (h2_server._protocol_error) with "
    "PROTOCOL_ERROR, because _protocol_error maps only FlowControlError and DenialOfServiceError "
    "instead of using exc.error_code (and writes its GOAWAY although jh2 wrote one). A peer that "
    "keeps the last GOAWAY's code reports the wrong error. Repro: a DATA frame of 16385 bytes"
)


@pytest.mark.parametrize("name", ["data_larger_than_max_frame_size", "ping_of_3_bytes"])
def test_the_goaways_of_a_connection_error_agree(stack, name):
    one = next(c for c in FRAME_CASES if c.name == name)
    with H2Client(stack.port("inbound")) as conn:
        conn.start()

        def req(method: str, path: str = "/agree") -> list[tuple[bytes, bytes]]:
            return request_fields(stack, "inbound", path, method)

        conn.send(one.build(conn, req))
        conn.wait_closed()
        codes = [CODE_NAMES.get(f.code, f.code) for f in conn.goaways]
        got = conn.describe()
    assert codes and set(codes) == {"FRAME_SIZE_ERROR"}, f"GOAWAY codes {codes}: {got}"


FRAME_HEADER_DEFECT = (
    "RFC 9113 section 4.2: a frame longer than SETTINGS_MAX_FRAME_SIZE (16384) is a "
    "FRAME_SIZE_ERROR, known from its 9-byte header; jh2's FrameBuffer checks the length only "
    "once the whole announced payload has arrived, so the sidecar buffers up to 16 MiB per "
    "connection of a frame it will refuse (measured: VmRSS +16 MiB for one connection sending a "
    "16 MiB DATA frame), and answers nothing meanwhile. Repro: HEADERS POST, then the header of a "
    "DATA frame of 0xffffff bytes and 64 KiB of it"
)


def test_an_oversized_frame_is_refused_on_its_header(stack):
    mark = new_mark("frame-header")
    with H2Client(stack.port("inbound")) as conn:
        conn.start()
        opened = headers(
            1, conn.block(request_fields(stack, "inbound", f"/{mark}", "POST")), end_stream=False
        )
        conn.send(opened + raw_frame(DATA, 0, 1, b"z" * 65536, length=0xFFFFFF))
        goaway = conn.goaway(1.0)
        got = conn.describe()
    assert goaway is not None and goaway.code == FRAME_SIZE_ERROR, got


# -- Upgrade: h2c -------------------------------------------------------------------------


UPGRADE = (
    "GET /{mark} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)
NEXT = "GET /{mark}-next HTTP/1.1\r\nHost: {host}\r\n\r\n"


@pytest.mark.parametrize("listener", LISTENERS)
def test_upgrade_h2c_is_not_honoured(stack, listener):
    """RFC 9113 section 3.1 deprecates the h2c upgrade: the request is answered as HTTP/1.1
    (no 101) and reaches the app without the upgrade headers. The answer closes the
    connection (the parser keeps no bytes after an upgrade request: see the next test)."""
    mark = new_mark("upgrade")
    values = {"mark": mark, "host": stack.authority(listener)}
    with RawConn(stack.port(listener)) as conn:
        conn.send(UPGRADE.format(**values).encode())
        first = conn.read_response()
    assert first is not None and first.raw.startswith(b"HTTP/1.1 200"), first
    assert (first.header("Connection") or "").lower() == "close", first
    with RawConn(stack.port(listener)) as conn:  # the next request, on a new connection
        conn.send(NEXT.format(**values).encode())
        second = conn.read_response()
    assert second is not None and second.status == 200, second
    seen = stack.reached(mark)
    assert [s["target"] for s in seen] == [f"/{mark}", f"/{mark}-next"], seen
    names = {name.lower() for name, _ in seen[0]["headers"]}
    assert not names & {"upgrade", "http2-settings"}, f"the upgrade headers reached the app: {sorted(names)}"


PIPELINED_UPGRADE = (
    "aiohttp 3.14's C parser pauses llhttp for any Upgrade but switches only for 'websocket', and "
    "then returns no tail: a request pipelined after an 'Upgrade: h2c' one (in the same read) is "
    "lost to the sidecar. So the answer to the upgrade request closes the connection, and the "
    "client knows to send the rest again, instead of waiting for an answer until the idle timeout"
)


@pytest.mark.parametrize("listener", LISTENERS)
def test_a_request_pipelined_after_upgrade_h2c_is_not_left_hanging(stack, listener):
    # see PIPELINED_UPGRADE
    mark = new_mark("upgrade-pipelined")
    values = {"mark": mark, "host": stack.authority(listener)}
    ex = exchange(stack.port(listener), (UPGRADE + NEXT).format(**values).encode(), responses=2, timeout=2)
    assert ex.first.status == 200 and (ex.first.header("Connection") or "").lower() == "close", ex.describe()
    assert ex.closed, ex.describe()
