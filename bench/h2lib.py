"""Microbenchmark of the HTTP/2 library choice: `h2` against `jh2` (its fork) on one
gRPC-shaped unary exchange, both ends in this one process.

    python bench/h2lib.py [--exchanges 20000] [--rounds 5] [--libs h2,jh2]

One exchange on one connection (a client and a server H2Connection passing bytes to each
other directly, no sockets): the client sends the request headers (POST
/bench.Echo/Unary, content-type application/grpc, te: trailers) and one DATA frame with a
framed message that ends the stream; the server parses it, acknowledges the data (the
WINDOW_UPDATE a proxy sends), answers headers, one DATA frame and the trailers
(grpc-status 0); the client parses those and acknowledges the data. So the time is what
both ends of one hop spend in the library (framing, HPACK, flow control, events) per
unary call, no I/O. Each round times `--exchanges` exchanges on a fresh connection pair
(streams 1, 3, 5, ...); the result is the median round, us per exchange, and jh2 / h2.
It measures the library only: a proxy's own work per call comes on top.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import platform
import statistics
import struct
import sys
import time
from typing import Any

PAYLOAD = b"\x0a\x05hello"  # a protobuf message: field 1, the string "hello"
MESSAGE = b"\x00" + struct.pack(">I", len(PAYLOAD)) + PAYLOAD  # gRPC framing: flag, length, bytes

REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "echo"),
    (":path", "/bench.Echo/Unary"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("grpc-timeout", "5S"),
    ("user-agent", "bench-h2lib"),
]
RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]
TRAILERS = [("grpc-status", "0"), ("grpc-message", "")]


class Lib:
    """One library's H2Connection, configuration and event classes, by module name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connection = importlib.import_module(f"{name}.connection")
        self.config = importlib.import_module(f"{name}.config")
        self.events = importlib.import_module(f"{name}.events")
        self.version = getattr(importlib.import_module(name), "__version__", "?")

    def pair(self) -> tuple[Any, Any]:
        """A connected client and server, the preface and both SETTINGS exchanged."""
        client = self.connection.H2Connection(self.config.H2Configuration(client_side=True))
        server = self.connection.H2Connection(
            self.config.H2Configuration(client_side=False, header_encoding=None)
        )
        client.initiate_connection()
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())  # the client's SETTINGS ack
        return client, server


def exchange(lib: Lib, client: Any, server: Any, stream_id: int) -> None:
    """One unary call: request headers + DATA (end of stream), response headers + DATA +
    trailers, each side acknowledging the data it received."""
    ev = lib.events
    client.send_headers(stream_id, REQUEST_HEADERS)
    client.send_data(stream_id, MESSAGE, end_stream=True)
    body = b""
    for event in server.receive_data(client.data_to_send()):
        if isinstance(event, ev.DataReceived):
            body += event.data
            server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    if body != MESSAGE:
        raise RuntimeError(f"{lib.name}: the server got {body!r}")
    server.send_headers(stream_id, RESPONSE_HEADERS)
    server.send_data(stream_id, MESSAGE)
    server.send_headers(stream_id, TRAILERS, end_stream=True)
    body, ended = b"", False
    for event in client.receive_data(server.data_to_send()):
        if isinstance(event, ev.DataReceived):
            body += event.data
            client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, ev.StreamEnded):
            ended = True
    server.receive_data(client.data_to_send())  # the client's WINDOW_UPDATE
    if body != MESSAGE or not ended:
        raise RuntimeError(f"{lib.name}: the client got {body!r} (ended: {ended})")


def time_round(lib: Lib, exchanges: int) -> float:
    """Seconds per exchange over `exchanges` calls on one new connection pair."""
    client, server = lib.pair()
    gc.collect()
    t0 = time.perf_counter()
    for i in range(exchanges):
        exchange(lib, client, server, 2 * i + 1)
    return (time.perf_counter() - t0) / exchanges


def run(libs: list[str], exchanges: int, rounds: int, warmup: int = 500) -> dict[str, Any]:
    loaded = [Lib(name) for name in libs]
    for lib in loaded:
        time_round(lib, warmup)
    per: dict[str, list[float]] = {lib.name: [] for lib in loaded}
    for _ in range(rounds):  # rounds interleaved, so that a noisy moment hits both libraries
        for lib in loaded:
            per[lib.name].append(time_round(lib, exchanges) * 1e6)
    return {
        "python": platform.python_version(),
        "exchanges": exchanges,
        "rounds": rounds,
        "libs": {
            lib.name: {
                "version": lib.version,
                "us_median": statistics.median(per[lib.name]),
                "us_min": min(per[lib.name]),
                "us_rounds": per[lib.name],
            }
            for lib in loaded
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exchanges", type=int, default=20000, help="unary exchanges per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--libs", default="h2,jh2", help="comma-separated modules with h2's API")
    args = p.parse_args(argv)
    libs = [name for name in args.libs.split(",") if name]
    result = run(libs, args.exchanges, args.rounds)
    print(
        f"Python {result['python']}: one gRPC-shaped unary exchange (headers + DATA + trailers, data "
        f"acknowledged), client and server in one process, {args.exchanges} per round, "
        f"median of {args.rounds} rounds:"
    )
    for name, r in result["libs"].items():
        print(
            f"  {name:<4} {r['version']:<8} {r['us_median']:7.1f} us/exchange (best round {r['us_min']:.1f})"
        )
    if "h2" in result["libs"] and "jh2" in result["libs"]:
        h2_us, jh2_us = result["libs"]["h2"]["us_median"], result["libs"]["jh2"]["us_median"]
        print(f"  jh2 / h2: {jh2_us / h2_us:.2f}x the time ({100 * (1 - jh2_us / h2_us):.0f}% less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
