"""A gRPC app for the tests (grpcio, raw bytes: no generated code), serving grpc.health.v1.

python -m tests.apps.grpc_app --port N [--name NAME]

Methods of `test.Echo` (requests and replies are raw bytes):
  Unary        b"<name>:" + the request
  Deadline     the seconds the call has left, as the app sees them (its grpc-timeout)
  Stream       request b"count,size,delay": `count` replies of `size` bytes, `delay` s apart
  Collect      client streaming: b"<messages>,<bytes>" received
  Bidi         each message back, prefixed with the name
  Hang         waits until the call is cancelled, then prints "cancelled Hang" (stdout)
  Fail         NOT_FOUND "nope"
  Unavailable  UNAVAILABLE "app says no" (counts the calls: "unavailable <n>" on stdout)
Prints "grpc_app listening on HOST:PORT" once bound (tests.helpers.ReportedPortProc).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

MAX_MESSAGE = 32 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="grpc")
    args = parser.parse_args()
    name = args.name.encode()
    lock = threading.Lock()
    counts = {"unavailable": 0}

    def say(line: str) -> None:
        print(line, flush=True)

    def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        return name + b":" + req

    def deadline(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        left = ctx.time_remaining()
        return b"none" if left is None else repr(left).encode()

    def stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        count, size, delay = req.decode().split(",")
        chunk = b"s" * int(size)
        for _ in range(int(count)):
            yield chunk
            if float(delay):
                time.sleep(float(delay))

    def collect(it: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        n = total = 0
        for message in it:
            n += 1
            total += len(message)
        return f"{n},{total}".encode()

    def bidi(it: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        for message in it:
            yield name + b":" + message

    def hang(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        done = threading.Event()
        ctx.add_callback(done.set)
        done.wait(30)
        if not ctx.is_active():
            say("cancelled Hang")
        return b"late"

    def fail(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        ctx.abort(grpc.StatusCode.NOT_FOUND, "nope")

    def unavailable(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        with lock:
            counts["unavailable"] += 1
            previous = dict(ctx.invocation_metadata()).get("grpc-previous-rpc-attempts", "0")
            say(f"unavailable {counts['unavailable']} previous={previous}")
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "app says no")

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Deadline": grpc.unary_unary_rpc_method_handler(deadline),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Hang": grpc.unary_unary_rpc_method_handler(hang),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Unavailable": grpc.unary_unary_rpc_method_handler(unavailable),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(16),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    say(f"grpc_app listening on 127.0.0.1:{port}")
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
