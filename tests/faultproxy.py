"""Network tools for the hardening tests: a raw HTTP/1.1 client and a fault-injecting TCP proxy.

Raw client: `exchange(port, data)` sends exact bytes and reads back every response with
its framing checked (was the body complete? did the server close?), so a test can tell a
clean answer from an aborted or truncated one.

FaultProxy: a small asyncio TCP proxy on 127.0.0.1 that runs its own loop in a background
thread, so synchronous tests can use it. Modes, changeable while it runs:
  pass         relay both ways (optionally with `latency` seconds per chunk);
  blackhole    accept, read and discard, never connect upstream, never answer;
  reset        read the first bytes of the request, then reset the connection (RST);
  close_after  relay, but close both sides after `after_bytes` bytes went back to the client.
`stop()` closes the listener and every connection and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import ReportedPortProc

# -- the crafted-bytes app as a process ---------------------------------------------------


class RawApp(ReportedPortProc):
    """On the port given, or on one the kernel picks (port 0) and the app reports."""

    def __init__(self, record: Path, *args: str, port: int | None = None) -> None:
        self.record = record
        super().__init__(
            [
                sys.executable,
                "-m",
                "tests.apps.raw_app",
                "--port",
                str(port or 0),
                "--record",
                str(record),
                *args,
            ],
            port,
        )

    def wait_up(self) -> RawApp:
        self.wait_listening()  # it prints the line once it listens
        return self

    def seen(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line.strip()]


# -- raw HTTP/1.1 client ---------------------------------------------------------------


@dataclass
class RawResponse:
    status: int | None  # None: no status line came back at all
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # the body's own framing (length, last chunk, or EOF) was satisfied
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this one
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Exchange:
    responses: list[RawResponse]
    closed: bool  # the server closed (or reset) the connection
    reset: bool  # ... with a reset
    error: str | None = None  # why reading stopped early (timeout, reset...)

    @property
    def first(self) -> RawResponse:
        return self.responses[0] if self.responses else RawResponse(status=None)

    def describe(self) -> str:
        parts = [f"{r.status} complete={r.complete} interim={r.interim}" for r in self.responses]
        return f"responses={parts or 'none'} closed={self.closed} reset={self.reset} error={self.error}"


class RawConn:
    """One client connection with a read buffer and response parsing."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.reset = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_background(self, data: bytes, piece: int = 65536) -> threading.Thread:
        """Send without blocking the reader (a server may answer and close mid-body)."""

        def run() -> None:
            with contextlib.suppress(OSError):
                for i in range(0, len(data), piece):
                    self.sock.sendall(data[i : i + piece])

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into the buffer; False at EOF/reset. Raises TimeoutError."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
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

    def _read_until(self, marker: bytes, deadline: float) -> bytes | None:
        while marker not in self.buf:
            if not self._fill(deadline):
                return None
        head, _, self.buf = self.buf.partition(marker)
        return head

    def _read_exact(self, n: int, deadline: float) -> tuple[bytes, bool]:
        while len(self.buf) < n:
            if not self._fill(deadline):
                data, self.buf = self.buf, b""
                return data, False
        data, self.buf = self.buf[:n], self.buf[n:]
        return data, True

    def read_response(self, method: str = "GET", timeout: float | None = None) -> RawResponse | None:
        """The next final response (1xx interim answers are collected on it); None at EOF."""
        deadline = time.monotonic() + (timeout or self.timeout)
        interim: list[int] = []
        while True:
            start = self.buf
            head = self._read_until(b"\r\n\r\n", deadline)
            if head is None:
                if self.buf or start:
                    return RawResponse(status=None, raw=self.buf, interim=interim)
                return None
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            try:
                status = int(parts[1])
            except (IndexError, ValueError):
                return RawResponse(status=None, raw=head, interim=interim)
            headers = []
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                headers.append((key.decode("latin-1"), value.strip().decode("latin-1")))
            resp = RawResponse(
                status=status,
                reason=parts[2].decode("latin-1") if len(parts) > 2 else "",
                headers=headers,
                raw=head,
                interim=interim,
            )
            if 100 <= status < 200 and status != 101:
                interim.append(status)
                continue
            break
        if method == "HEAD" or status in (101, 204, 304):
            resp.complete = True
            return resp
        te = (resp.header("Transfer-Encoding") or "").lower()
        length = resp.header("Content-Length")
        if "chunked" in te:
            body = b""
            while True:
                line = self._read_until(b"\r\n", deadline)
                if line is None:
                    break
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    break
                if size == 0:
                    # trailers end with an empty line
                    while (trailer := self._read_until(b"\r\n", deadline)) not in (None, b""):
                        pass
                    resp.complete = trailer == b""
                    break
                data, ok = self._read_exact(size + 2, deadline)
                body += data[:size]
                if not ok:
                    break
            resp.body = body
        elif length is not None and length.strip().isdigit():
            resp.body, resp.complete = self._read_exact(int(length), deadline)
        else:  # delimited by close
            while self._fill(deadline):
                pass
            resp.body, self.buf = self.buf, b""
            resp.complete = not self.reset
        return resp

    def wait_closed(self, wait: float) -> bool:
        """True when the server closes (or resets) the connection within `wait` seconds."""
        deadline = time.monotonic() + wait
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return True


def exchange(
    port: int,
    data: bytes,
    *,
    responses: int = 1,
    method: str = "GET",
    timeout: float = 3.0,
    close_wait: float = 0.5,
    host: str = "127.0.0.1",
) -> Exchange:
    """Send `data`, read up to `responses` responses, then see whether the server closes."""
    got: list[RawResponse] = []
    error = None
    with RawConn(port, host, timeout) as conn:
        conn.send_in_background(data)
        try:
            for _ in range(responses):
                resp = conn.read_response(method)
                if resp is None:
                    break
                got.append(resp)
                if resp.status is None:
                    break
            closed = conn.wait_closed(close_wait)
        except TimeoutError:
            error = "timed out waiting for a response"
            closed = False
        return Exchange(got, closed or conn.eof, conn.reset, error)


# -- the fault-injecting proxy ---------------------------------------------------------


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        mode: str = "pass",
        latency: float = 0.0,
        after_bytes: int = 0,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.target = (target_host, target_port)
        self.listen = listen
        self.mode = mode
        self.latency = latency
        self.after_bytes = after_bytes
        self.port = 0
        self.accepted = 0
        self.sent_upstream = bytearray()  # every byte clients sent through the proxy, for inspection
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __repr__(self) -> str:
        return f"<FaultProxy :{self.port} -> {self.target[1]} mode={self.mode}>"

    def set(self, mode: str | None = None, *, latency: float | None = None, after_bytes: int | None = None):
        if mode is not None:
            self.mode = mode
        if latency is not None:
            self.latency = latency
        if after_bytes is not None:
            self.after_bytes = after_bytes
        return self

    def start(self) -> FaultProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        with contextlib.suppress(Exception):
            fut.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            mode = self.mode
            if mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            if mode == "reset":
                await reader.read(65536)  # the request (or its start) was read
                _rst(writer)
                return
            up_reader, upstream_writer = await asyncio.open_connection(*self.target)
            self._writers.add(upstream_writer)
            budget = [self.after_bytes if mode == "close_after" else -1]
            await asyncio.gather(
                self._pipe(reader, upstream_writer, None, self.sent_upstream),
                self._pipe(up_reader, writer, budget),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    with contextlib.suppress(Exception):
                        w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        budget: list[int] | None,
        record: bytearray | None = None,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if record is not None and len(record) < 16 * 1024 * 1024:
                    record.extend(data)
                if self.latency:
                    await asyncio.sleep(self.latency)
                if self.mode == "blackhole":
                    continue
                if budget is not None and budget[0] >= 0:
                    data = data[: budget[0]]
                    budget[0] -= len(data)
                    writer.write(data)
                    await writer.drain()
                    if budget[0] <= 0:
                        writer.close()
                        return
                    continue
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):
            writer.transport.abort()
