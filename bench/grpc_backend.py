"""The gRPC backend of bench/'s gRPC rows (grpcio): `/bench.Echo/Unary` answers a fixed small
message, `/bench.Echo/Caller` the `x-sidecar-caller` it was called with.

    python bench/grpc_backend.py PORT [THREADS]

Raw bytes in and out (a generic handler, no generated code): the request's payload is not
parsed, the answer is always REPLY. Its CPU is not what the bench measures (the proxy's
is); it only must not be the first thing to run out of CPU. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

REPLY = b"\x0a\x05hello"  # a protobuf message: field 1, the string "hello"
SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
CALLER = f"/{SERVICE}/Caller"


def unary(request: bytes, context: Any) -> bytes:
    return REPLY


def caller(request: bytes, context: Any) -> bytes:
    """Who the sidecar in front of this app said called (it sets x-sidecar-caller only for a
    caller it verified over mutual TLS): b"" for none."""
    for key, value in context.invocation_metadata():
        if key == "x-sidecar-caller":
            return value.encode() if isinstance(value, str) else bytes(value)
    return b""


def serve(port: int, threads: int) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Caller": grpc.unary_unary_rpc_method_handler(caller),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        handlers=[handler],
        options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 1000)],
    )
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        # the bench reads this as a port that was taken (see harness.ADDRESS_IN_USE_RE)
        print(f"cannot bind 127.0.0.1:{port}: address already in use", flush=True)
        sys.exit(98)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"grpc backend on 127.0.0.1:{port}, {threads} threads", flush=True)
    while not stop.wait(0.2):  # a timed wait: the signal handler runs between two
        pass
    server.stop(None)  # calls in flight are cancelled: the bench is over
    os._exit(0)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8)
