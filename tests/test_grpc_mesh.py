"""gRPC through the mesh, with stock grpcio clients and servers (tests/apps/grpc_app.py).

The stack: three `echo` instances (grpcio apps behind sidecars with --app-protocol h2c
and --health-grpc), one `plain` HTTP/1.1 app, a `guarded` gRPC service that lets no one
in (--allow-from), and the `caller` sidecar whose outbound listener the clients use,
naming the service by :authority. Sidecars talk mutual TLS (the default, permissive).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.helpers import App, ReportedPortProc, Sidecar, free_port, wait_for

MiB = 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", 32 * MiB), ("grpc.max_send_message_length", 32 * MiB)]


class GrpcApp(ReportedPortProc):
    def __init__(self, name: str) -> None:
        import sys

        super().__init__([sys.executable, "-m", "tests.apps.grpc_app", "--port", "0", "--name", name])


def echo_sidecar(app: GrpcApp, name: str, registry: Path, *extra: str) -> Sidecar:
    return Sidecar(
        app.port,
        "--name",
        name,
        "--app-protocol",
        "h2c",
        "--health-grpc",
        "--access-log",
        "text",
        *extra,
        registry_path=registry,
    )


@dataclass
class Stack:
    apps: list[GrpcApp]
    echoes: list[Sidecar]
    caller: Sidecar
    upstream_port: int
    registry: Path

    def channel(self, authority: str = "echo", port: int | None = None) -> grpc.Channel:
        options = [*OPTIONS]
        if authority:
            options.append(("grpc.default_authority", authority))
        return grpc.insecure_channel(f"127.0.0.1:{port or self.caller.outbound_port}", options=options)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("grpc")
    registry = tmp / "registry.sqlite3"
    procs: list[ReportedPortProc | Sidecar] = []
    try:
        apps = [GrpcApp(f"echo-{i}") for i in range(3)]
        plain = App("plain")
        procs += [*apps, plain]
        echoes = [echo_sidecar(app, "echo", registry) for app in apps]
        guarded = echo_sidecar(apps[0], "guarded", registry, "--allow-from", "nobody")
        plain_sidecar = Sidecar(plain.port, "--name", "plain", registry_path=registry)
        plain_sidecar.wait_started()
        # an h2c "app" that speaks plain HTTP: plain's own sidecar, which takes HTTP/2
        bridge = Sidecar(
            plain_sidecar.inbound_port, "--name", "bridge", "--app-protocol", "h2c", registry_path=registry
        )
        upstream_port = free_port()
        caller = Sidecar(
            plain.port,
            "--name",
            "caller",
            "--access-log",
            "text",
            "--upstream",
            f"echo={upstream_port}",
            registry_path=registry,
        )
        procs += [*echoes, guarded, plain_sidecar, bridge, caller]
        for sidecar in [*echoes, guarded, plain_sidecar, bridge, caller]:
            sidecar.wait_ready(30)
        stack = Stack(apps, echoes, caller, upstream_port, registry)
        # the caller sees all three instances before the tests start
        with stack.channel() as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            wait_for(lambda: len({unary(b"", timeout=5).split(b":")[0] for _ in range(12)}) == 3, 15)
        yield stack
        for proc in procs:
            assert "Traceback" not in proc.output(), proc.output()[-3000:]
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_unary_and_streaming_calls_cross_the_mesh_over_mutual_tls(stack: Stack) -> None:
    with stack.channel() as channel:
        assert channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=10).endswith(b":hi")
        replies = list(channel.unary_stream("/test.Echo/Stream")(b"3,5,0", timeout=10))
        assert replies == [b"sssss"] * 3
        got = channel.stream_unary("/test.Echo/Collect")(iter([b"ab", b"cde", b"f"]), timeout=10)
        assert got == b"3,6"
        echoed = list(channel.stream_stream("/test.Echo/Bidi")(iter([b"a", b"b"]), timeout=10))
        assert [m.split(b":")[1] for m in echoed] == [b"a", b"b"]
    # the hop between the sidecars was mutual TLS: the callee's sidecar names its caller
    wait_for(lambda: any("/test.Echo/Collect" in e.output() for e in stack.echoes), 5)
    served = next(e.output() for e in stack.echoes if "/test.Echo/Collect" in e.output())
    line = next(x for x in served.splitlines() if "/test.Echo/Collect" in x)
    assert "caller=caller" in line and "protocol=HTTP/2" in line and "grpc_status=0" in line
    outbound = next(x for x in stack.caller.output().splitlines() if "/test.Echo/Collect" in x)
    assert "protocol=HTTP/2" in outbound and "grpc_status=0" in outbound


def test_a_bidirectional_stream_flows_message_by_message(stack: Stack) -> None:
    """Each reply comes back before the next request is sent: nothing waits for the
    whole request stream (a copy kept for retries never delays forwarding)."""
    import queue

    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := outgoing.get(timeout=10)) is not None:
            yield item

    with stack.channel() as channel:
        call = channel.stream_stream("/test.Echo/Bidi")(requests(), timeout=20)
        for word in (b"one", b"two", b"three"):
            outgoing.put(word)
            assert next(call).endswith(b":" + word)
        outgoing.put(None)
        assert list(call) == []


def test_16_mib_messages_both_ways(stack: Stack) -> None:
    with stack.channel() as channel:
        big = bytes(range(256)) * (16 * MiB // 256)
        reply = channel.unary_unary("/test.Echo/Unary")(big, timeout=30)
        assert len(reply) == len(big) + len(b"echo-0:") and reply.endswith(big[-1000:])
        replies = list(channel.unary_stream("/test.Echo/Stream")(f"2,{16 * MiB},0".encode(), timeout=30))
        assert [len(r) for r in replies] == [16 * MiB, 16 * MiB]


def test_one_client_connection_is_balanced_over_every_instance(stack: Stack) -> None:
    with stack.channel() as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        served = [unary(b"x", timeout=10).split(b":")[0] for _ in range(60)]
    counts = {name: served.count(name) for name in set(served)}
    assert set(counts) == {b"echo-0", b"echo-1", b"echo-2"}, counts
    assert min(counts.values()) >= 5, counts


def test_no_upstream_stream_outlives_its_call(stack: Stack) -> None:
    """Many concurrent calls, then none open: a finished stream frees its slot even when
    its answer arrived whole before the relay read it (a leak once filled every
    connection and the calls waited for a free stream until their deadline)."""
    with stack.channel() as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        futures = [unary.future(b"c" * 100, timeout=20) for _ in range(400)]
        assert all(f.result().endswith(b"c" * 100) for f in futures)
        list(channel.unary_stream("/test.Echo/Stream")(b"20,1000,0", timeout=20))

    def settled() -> bool:
        caller = stack.caller.status()["requests"]["outbound_h2_streams"]
        echoes = [e.status()["requests"]["inbound_h2_streams"] for e in stack.echoes]
        return caller == 0 and echoes == [0, 0, 0]

    wait_for(settled, 5, what="no HTTP/2 stream left open to an upstream")


def test_a_busy_client_connection_is_not_taken_for_a_flood(stack: Stack) -> None:
    """grpcio sends a connection WINDOW_UPDATE after every answer: 2,500 calls on one
    channel in a few seconds are ordinary traffic, not a control-frame flood."""
    with stack.channel() as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        for _ in range(2500):
            assert unary(b"w", timeout=10).endswith(b":w")


def test_grpc_timeout_is_the_deadline_and_reaches_the_app_shrunk(stack: Stack) -> None:
    with stack.channel() as channel:
        left = float(channel.unary_unary("/test.Echo/Deadline")(b"", timeout=3))
        assert 1.5 < left < 3.05  # (grpcio rounds the timeout it sends up a little)
        # no grpc-timeout: no deadline at all (--request-timeout does not cut gRPC calls)
        unbounded = channel.unary_unary("/test.Echo/Deadline")(b"", timeout=None)
        assert unbounded == b"none" or float(unbounded) > 1e6  # grpcio: "infinite" as a huge number
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Echo/Hang")(b"", timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3
    # the app's call was cancelled when the deadline passed, not left running
    wait_for(lambda: sum(a.output().count("cancelled Hang") for a in stack.apps) >= 1, 10)


def test_a_cancelled_call_is_cancelled_at_the_app(stack: Stack) -> None:
    before = sum(a.output().count("cancelled Hang") for a in stack.apps)
    with stack.channel() as channel:
        future = channel.unary_unary("/test.Echo/Hang").future(b"", timeout=30)
        time.sleep(0.5)
        assert future.cancel()
    wait_for(lambda: sum(a.output().count("cancelled Hang") for a in stack.apps) > before, 10)


def _status(call: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    metadata = {k: v for k, v in (call.trailing_metadata() or ())}  # type: ignore[attr-defined]
    return call.code(), call.details() or "", metadata  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("authority", "code", "error"),
    [
        ("nosuch", grpc.StatusCode.NOT_FOUND, "unknown_service"),
        ("plain", grpc.StatusCode.UNIMPLEMENTED, "app_protocol_mismatch"),
        ("guarded", grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    ],
)
def test_the_sidecars_own_errors_are_grpc_statuses(stack: Stack, authority: str, code, error: str) -> None:
    with stack.channel(authority) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/test.Echo/Unary")(b"", timeout=10)
    got, details, metadata = _status(caught.value)
    assert got == code, (got, details)
    assert details.startswith("micro-sidecar ") and "sidecar" in details
    assert metadata.get("x-sidecar-error") == error


def test_a_service_with_no_healthy_instance_is_unavailable(stack: Stack, tmp_path: Path) -> None:
    gone = free_port()  # nothing listens there: the app is down
    ghost = Sidecar(gone, "--name", "ghost", "--app-protocol", "h2c", registry_path=stack.registry)
    try:
        ghost.wait_started()
        with stack.channel("ghost") as channel:

            def unavailable() -> bool:
                try:
                    channel.unary_unary("/test.Echo/Unary")(b"", timeout=5)
                except grpc.RpcError as exc:
                    got, details, _ = _status(exc)
                    return got == grpc.StatusCode.UNAVAILABLE and details.startswith("micro-sidecar")
                return False

            wait_for(unavailable, 10, what="UNAVAILABLE for a service whose app is down")
    finally:
        ghost.stop()


def test_an_app_unavailable_answer_is_retried_within_the_budget(stack: Stack) -> None:
    before = [len(re.findall(r"unavailable \d+", a.output())) for a in stack.apps]
    with stack.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/test.Echo/Unavailable")(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "app says no"  # the app's own answer, relayed
    after = [len(re.findall(r"unavailable \d+", a.output())) for a in stack.apps]
    # the first try and --retries 2, each on another instance, each told its attempt
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    attempts = sorted(
        int(m) for a in stack.apps for m in re.findall(r"unavailable \d+ previous=(\d+)", a.output())
    )
    assert attempts == [0, 1, 2]  # (only this test calls Unavailable)


def test_a_dead_instance_is_stepped_over(stack: Stack) -> None:
    app = GrpcApp("doomed")
    sidecar = echo_sidecar(app, "echo", stack.registry)
    try:
        sidecar.wait_ready(30)
        with stack.channel() as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            wait_for(lambda: any(unary(b"", timeout=5).startswith(b"doomed") for _ in range(8)), 15)
            app.popen.kill()
            app.popen.wait(5)
            # POSTs all of them: an instance whose app is gone never ran them, so they move on
            replies = [unary(b"p", timeout=10) for _ in range(30)]
        assert all(r.endswith(b":p") and not r.startswith(b"doomed") for r in replies)
    finally:
        sidecar.stop()
        app.stop()


def test_the_upstream_port_calls_one_service_without_an_authority(stack: Stack) -> None:
    with stack.channel(authority="", port=stack.upstream_port) as channel:
        assert channel.unary_unary("/test.Echo/Unary")(b"u", timeout=10).endswith(b":u")
        assert len(list(channel.unary_stream("/test.Echo/Stream")(b"2,3,0", timeout=10))) == 2


def test_http2_requests_reach_an_http1_app(stack: Stack) -> None:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--http2-prior-knowledge",
            "-H",
            "Host: plain",
            "-w",
            "\n%{http_code} %{http_version}",
            f"{stack.caller.outbound}/echo?x=1",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    assert status == "200 2"
    assert '"path": "/echo"' in body or "/echo" in body


def test_http1_requests_reach_an_h2c_app(stack: Stack) -> None:
    """HTTP/1.1 in, HTTP/2 to the app (--app-protocol h2c), body and all."""
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--http1.1",
            "-H",
            "Host: bridge",
            "--data-binary",
            "x" * 100_000,
            "-w",
            "\n%{http_code} %{http_version}",
            f"{stack.caller.outbound}/echo",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    assert status == "200 1.1"
    seen = json.loads(body)
    assert seen["app"] == "plain" and seen["method"] == "POST" and seen["body_len"] == 100_000


def test_the_sidecars_deadline_is_deadline_exceeded_not_unavailable(stack: Stack) -> None:
    """A deadline shorter than the client's own (here the previous hop's budget, which a
    client may send too) ends the call at the sidecar with DEADLINE_EXCEEDED, naming it."""
    with stack.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/test.Echo/Hang")(b"", timeout=10, metadata=[("x-sidecar-deadline-ms", "300")])
    got, details, metadata = _status(caught.value)
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    # (whichever of the two sidecars on the way runs out first says so)
    assert details.startswith("micro-sidecar ") and metadata.get("x-sidecar-error") == "upstream_timeout"


def test_a_slow_reader_of_a_long_stream_does_not_grow_memory(stack: Stack) -> None:
    """100 MiB streamed to a client that reads slowly: flow control holds the app back,
    the sidecars buffer at most a window."""
    sidecars = [stack.caller, *stack.echoes]
    before = [s.rss_kib() for s in sidecars]
    with stack.channel() as channel:
        total = 0
        for i, message in enumerate(
            channel.unary_stream("/test.Echo/Stream")(f"100,{MiB},0".encode(), timeout=60)
        ):
            total += len(message)
            if i % 10 == 0:
                time.sleep(0.2)
    assert total == 100 * MiB
    grown = [(s.rss_kib() - b) // 1024 for s, b in zip(sidecars, before, strict=True)]
    assert max(grown) < 40, f"RSS grew by {grown} MiB"


def test_draining_lets_an_open_stream_finish(stack: Stack) -> None:
    app = GrpcApp("drain")
    sidecar = echo_sidecar(app, "drainer", stack.registry, "--grace-period", "10")
    try:
        sidecar.wait_ready(30)
        with grpc.insecure_channel(f"127.0.0.1:{sidecar.inbound_port}", options=OPTIONS) as channel:
            call = channel.unary_stream("/test.Echo/Stream")(b"10,100,0.15", timeout=20)
            assert next(call) == b"s" * 100
            sidecar.signal(signal.SIGTERM)
            rest = list(call)
            assert len(rest) == 9 and call.code() == grpc.StatusCode.OK
        assert sidecar.wait(15) == 0
    finally:
        sidecar.stop()
        app.stop()


def _established(port: int) -> int:
    """Established TCP connections whose local port is `port` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_a_peer_at_its_stream_limit_gets_another_connection(stack: Stack) -> None:
    app = GrpcApp("narrow")
    sidecar = echo_sidecar(app, "narrow", stack.registry, "--h2-max-streams", "2")
    try:
        sidecar.wait_ready(30)
        with stack.channel("narrow") as channel:
            stream = channel.unary_stream("/test.Echo/Stream")
            wait_for(lambda: _try(lambda: list(stream(b"1,1,0", timeout=5))), 15, what="narrow reachable")
            calls = [stream(b"4,10,0.4", timeout=20) for _ in range(6)]
            first = [next(call) for call in calls]  # all six streams are open at once
            peak = _established(sidecar.inbound_port)
            rest = [list(call) for call in calls]
        assert first == [b"s" * 10] * 6 and all(len(r) == 3 for r in rest)
        assert peak >= 3, f"{peak} connections for 6 streams at 2 per connection"
    finally:
        sidecar.stop()
        app.stop()


def _try(fn) -> bool:  # type: ignore[no-untyped-def]
    try:
        fn()
    except grpc.RpcError:
        return False
    return True


def test_a_draining_instance_loses_no_calls(stack: Stack) -> None:
    """A rolling restart: one instance's sidecar is stopped while calls keep coming; its
    GOAWAY and its registry news move them to the others, and none fails."""
    app = GrpcApp("leaving")
    sidecar = echo_sidecar(app, "echo", stack.registry, "--drain-delay", "0.5")
    try:
        sidecar.wait_ready(30)
        with stack.channel() as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            wait_for(lambda: any(unary(b"", timeout=5).startswith(b"leaving") for _ in range(8)), 15)
            served: list[bytes] = []
            stopped_at = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                served.append(unary(b"d", timeout=10).split(b":")[0])
                if len(served) == 20:
                    sidecar.signal(signal.SIGTERM)
                    stopped_at = len(served)
                if stopped_at and sidecar.popen.poll() is not None and len(served) > stopped_at + 40:
                    break
        assert sidecar.wait(15) == 0
        assert b"leaving" in served[:20] and b"leaving" not in served[-20:]
    finally:
        sidecar.stop()
        app.stop()


def test_overload_and_a_plaintext_caller_under_strict_mtls_are_grpc_statuses(stack: Stack) -> None:
    strict = echo_sidecar(
        stack.apps[1], "strictsvc", stack.registry, "--mtls", "strict", "--max-outstanding", "1"
    )
    try:
        strict.wait_ready(30)
        # a plaintext call to a strict sidecar's inbound port: UNAUTHENTICATED
        with (
            grpc.insecure_channel(f"127.0.0.1:{strict.inbound_port}") as channel,
            pytest.raises(grpc.RpcError) as c,
        ):
            channel.unary_unary("/test.Echo/Unary")(b"", timeout=10)
        got, details, metadata = _status(c.value)
        assert got == grpc.StatusCode.UNAUTHENTICATED and metadata.get("x-sidecar-error") == "mtls_required"
        # more calls in flight than --max-outstanding: RESOURCE_EXHAUSTED at once
        options = [("grpc.default_authority", "echo")]
        with grpc.insecure_channel(f"127.0.0.1:{strict.outbound_port}", options=options) as channel:
            hang = channel.unary_unary("/test.Echo/Hang").future(b"", timeout=20)
            unary = channel.unary_unary("/test.Echo/Unary")

            def outstanding() -> int:
                entry = strict.status()["upstreams"].get("echo")
                return entry.get("outstanding", 0) if isinstance(entry, dict) else 0

            wait_for(lambda: outstanding() == 1, 10, what=f"the first call in flight ({hang.done()})")
            with pytest.raises(grpc.RpcError) as c:
                unary(b"", timeout=5)
            got, details, metadata = _status(c.value)
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(
                "micro-sidecar strictsvc:"
            )
            assert metadata.get("x-sidecar-error") == "service_overloaded"
            hang.cancel()
    finally:
        strict.stop()
