"""The request and response of the lean HTTP/1.1 server in `server.py`.

A `Request` is what a handler gets: the parsed head (llhttp, aiohttp's C parser), the body
as a byte stream, and the methods that write the answer on the client connection. A
handler either returns a whole `Response` (the server writes it, head and body in one
write) or streams its answer with `Request.start` / `write` / `end` and returns a
`Response` that only describes what was sent (status, request id) for the access log.

Rules of this file:
- the answer's framing follows RFC 9112 section 6: Content-Length when the length is known,
  chunked for an HTTP/1.1 client otherwise, and for an HTTP/1.0 client a body delimited
  by closing the connection; no body (and no framing) for HEAD, 1xx, 204 and 304;
- `Connection: close` is sent on the answer whenever the connection closes after it;
- every write to a client that left raises ConnectionResetError, never writes to a
  closed transport.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp.streams import EmptyStreamReader
from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from aiohttp.streams import StreamReader

    from .tls import PeerCertificate

Headers = list[tuple[str, str]]

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_REASONS[499] = "Client Closed Request"  # nginx's: only ever in our own logs
_NO_BODY_STATUS = frozenset({204, 304})


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The current time as an HTTP date, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class Response:
    """A whole answer (status, headers, body) for the server to send, or, with `sent`, the
    record of an answer the handler streamed itself."""

    __slots__ = ("body", "close", "grpc_status", "headers", "reason", "request_id", "sent", "status")

    def __init__(
        self,
        status: int,
        headers: Headers | None = None,
        body: bytes = b"",
        *,
        reason: str | None = None,
        close: bool = False,
        request_id: str | None = None,
        sent: bool = False,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers if headers is not None else []
        self.body = body
        self.close = close
        self.request_id = request_id
        self.sent = sent
        self.grpc_status: str | None = None  # a gRPC call's status, for the records

    def __repr__(self) -> str:
        return f"<Response {self.status}{' sent' if self.sent else ''}>"


class Connection(Protocol):
    """What a Request needs of its client connection (server.ClientConnection)."""

    transport: asyncio.Transport | None
    remote: str
    closing: bool
    peer: PeerCertificate | None

    @property
    def draining(self) -> bool: ...

    @property
    def writing_paused(self) -> bool: ...

    def client_gone(self) -> bool: ...
    async def drain(self) -> None: ...
    def take_over(self) -> StreamReader: ...


class Request:
    """One request on a client connection: its head, its body and how to answer it."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_message",
        "close",
        "content",
        "head_sent",
        "headers",
        "method",
        "peer",
        "raw_path",
        "remote",
        "transport",
        "version",
    )

    grpc = False  # gRPC needs HTTP/2 (see h2_server.H2Request)

    @property
    def scheme(self) -> str:
        return "http" if self.peer is None else "https"

    def __init__(self, conn: Connection, message: Any, payload: StreamReader) -> None:
        self._conn = conn
        self._message = message
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        self.remote = conn.remote
        # the certificate a TLS client presented (None: plaintext); verified by the handshake
        self.peer = conn.peer
        self.transport = conn.transport
        # the client asked to close (Connection: close, or HTTP/1.0 without keep-alive)
        self.close: bool = bool(message.should_close)
        self.head_sent = False
        self._chunked = False

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_path}>"

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        raw: tuple[tuple[bytes, bytes], ...] = self._message.raw_headers
        return raw

    @property
    def body_exists(self) -> bool:
        return type(self.content) is not EmptyStreamReader

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def path_qs(self) -> str:
        """The origin-form target (path and query), also for an absolute-form request."""
        if self.raw_path.startswith("/"):
            return self.raw_path
        return str(self._message.url.relative())

    # -- answering -------------------------------------------------------------------

    def send_continue(self) -> None:
        """`100 Continue` to a client that sent `Expect: 100-continue` (HTTP/1.1)."""
        if not self._conn.client_gone() and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def client_gone(self) -> bool:
        """Whether the client closed its connection (or it is closing)."""
        return self._conn.client_gone()

    def keeps_alive(self) -> bool:
        """Whether the connection can carry another request after this answer: not when
        either side asked to close, the sidecar is draining, or the request body was not
        read to its end (an early answer: what follows cannot be told from a next request,
        so the connection closes, and the answer must say so)."""
        conn = self._conn
        return not (self.close or conn.closing or conn.draining) and self.content.is_eof()

    def send(self, response: Response) -> None:
        """Write a whole Response: head and body in one write."""
        headers = response.headers
        if not any(name.lower() == "date" for name, _ in headers):
            headers = [*headers, ("Date", http_date())]
        if response.close:
            self.close = True
        body = response.body
        self._out(self._compose(response.status, response.reason, headers, len(body), body, True, False))

    async def start(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        *,
        reason: str | None = None,
        data: bytes = b"",
        end: bool = False,
        raw: bool = False,
        trailers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Send the response head and, after it in the same write, the first body bytes.

        The body is framed by `length` when given, else chunked (or, for HTTP/1.0,
        delimited by the close). `end` sends the end of the body too. `raw` (a 101
        Switching Protocols) sends no framing: what follows is the new protocol.
        """
        await self._write(self._compose(status, reason, headers, length, data, end, raw))

    def _compose(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        length: int | None,
        data: bytes,
        end: bool,
        raw: bool,
    ) -> bytes:
        """The head with its framing, and the first body bytes framed to match."""
        framing = ""
        unframed = raw or status < 200 or status in _NO_BODY_STATUS
        has_body = not (unframed or self.method == "HEAD")
        if unframed:
            pass
        elif length is not None:  # also for HEAD: the length the body would have
            framing = f"Content-Length: {length}\r\n"
        elif not has_body:
            pass
        elif self.version == (1, 1):
            framing = "Transfer-Encoding: chunked\r\n"
            self._chunked = True
        else:
            self.close = True  # HTTP/1.0: the body ends when the connection does
        head = self._head(status, reason, headers, framing, upgrade=raw)
        self.head_sent = True
        if not has_body:
            return head
        if self._chunked:
            if data:
                data = b"%x\r\n%b\r\n" % (len(data), data)
            if end:
                data += b"0\r\n\r\n"
                self._chunked = False
        return head + data if data else head

    async def write(self, data: bytes) -> None:
        """More body bytes (framed as the head said), or, after a 101, tunnelled bytes."""
        if not data:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        await self._write(data)

    async def end(self, trailers: list[tuple[str, str]] | None = None) -> None:
        """The end of the body (the last chunk, when chunked). HTTP/1.1 clients get no
        trailers: none of ours asks for them, and gRPC needs HTTP/2 anyway."""
        if self._chunked:
            self._chunked = False
            await self._write(b"0\r\n\r\n")

    def _head(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        framing: str,
        upgrade: bool = False,
    ) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason or reason_phrase(status)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        if framing:
            lines.append(framing)
        if upgrade:  # the handler's headers carry Connection: Upgrade
            pass
        elif not self.keeps_alive():
            self.close = True
            lines.append("Connection: close\r\n")
        elif self.version == (1, 0):
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _out(self, data: bytes) -> None:
        if self._conn.client_gone() or self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    async def _write(self, data: bytes) -> None:
        self._out(data)
        if self._conn.writing_paused:
            await self._conn.drain()

    def fail_answer(self, why: str) -> None:
        """The answer cannot be completed: only a broken connection says so honestly."""
        if self.transport is not None:
            self.transport.abort()

    def take_over(self) -> StreamReader:
        """After a 101: every byte the client sends from now on, unparsed."""
        return self._conn.take_over()
