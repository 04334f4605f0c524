"""The gRPC helpers of the protocol wing: the pure encodings as tables, and the health call
against a real grpc.aio server (and a dead port, a silent one, one that speaks HTTP/1.1)."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import jh2.config
import jh2.connection
import jh2.events
import jh2.exceptions
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from sidecar.http.grpc import (
    GrpcProbeError,
    HealthAnswer,
    Status,
    check_health,
    decode_message,
    encode_message,
    format_timeout,
    frame,
    health_request,
    health_status,
    is_grpc,
    parse_timeout,
    split_messages,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("Application/GRPC; charset=utf-8", True),
        ("application/grpc+json;x=1", True),
        ("application/grpc-web", False),
        ("application/grpc-web+proto", False),
        ("application/grpcx", False),
        ("application/json", False),
        ("", False),
        (None, False),
    ],
)
def test_is_grpc(value, expected):
    assert is_grpc(value) is expected


def test_status_codes():
    assert len(Status) == 17
    assert [Status(i).value for i in range(17)] == list(range(17))
    assert Status.OK == 0 and Status.UNIMPLEMENTED == 12 and Status.UNAUTHENTICATED == 16


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1H", 3600.0),
        ("2M", 120.0),
        ("3S", 3.0),
        ("1500m", 1.5),
        ("250u", 250e-6),
        ("7n", 7e-9),
        ("99999999S", 99999999.0),
        ("0m", 0.0),
        ("00000001S", 1.0),
    ],
)
def test_parse_timeout(value, seconds):
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        *(None, "", "S", "10", "123456789S", "1.5S", "-1S", "1s", "1 S", " 1S", "1S\n", "1SS", "1x", "+1S"),
        "\u0661S",  # an Arabic-Indic digit one: a digit to str.isdigit, not an ASCII one
    ],
)
def test_parse_timeout_malformed_is_none(value):
    assert parse_timeout(value) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (1.5, "1500m"),
        (0.25, "250m"),
        (1.001, "1001m"),
        (2.0, "2S"),
        (120.0, "2M"),
        (7200.0, "2H"),
        (1.0009, "1S"),  # rounded down to whole milliseconds: 1000m, spelled 1S
        (0.0005, "500u"),
        (0.0000015, "1u"),
        (5e-7, "500n"),
        (1e-12, "1n"),
        (0.0, "0n"),
        (-3.0, "0n"),
        (100_000.5, "100000S"),  # 8 digits of ms would not hold it
        (99_999_999.9, "99999999S"),
        (10**12, "99999999H"),  # clamped: 277777777H has 9 digits
    ],
)
def test_format_timeout(seconds, text):
    assert format_timeout(seconds) == text


@pytest.mark.parametrize("seconds", [0.0004, 0.001, 0.123, 1.5, 59.999, 3600.0, 86_400.25, 1e6, 3e7])
def test_format_timeout_round_trips_within_one_unit_and_never_over(seconds):
    text = format_timeout(seconds)
    assert len(text) <= 9 and text[:-1].isdigit()
    back = parse_timeout(text)
    assert back is not None and 0 < back <= seconds * (1 + 1e-12)
    assert seconds - back < max(1e-3, seconds * 1e-6) or text.endswith(("S", "M", "H"))


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("plain text", "plain text"),
        ("100% done", "100%25 done"),
        ("line\nbreak", "line%0Abreak"),
        ("café", "caf%C3%A9"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("~ ok ~", "~ ok ~"),
        ("", ""),
    ],
)
def test_encode_and_decode_message(text, encoded):
    assert encode_message(text) == encoded
    assert decode_message(encoded) == text


@pytest.mark.parametrize("text", ["ünïcödé ✓ 🚀", "%%%", "tab\tand\x7fdel", "a%2"])
def test_message_round_trip(text):
    encoded = encode_message(text)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert decode_message(encoded) == text


def test_decode_message_is_lenient():
    assert decode_message("50%zz off") == "50%zz off"
    assert decode_message("bad %FF byte") == "bad \ufffd byte"


def test_frame_and_split():
    assert frame(b"") == b"\x00\x00\x00\x00\x00"
    assert frame(b"ab", compressed=True) == b"\x01\x00\x00\x00\x02ab"
    stream = frame(b"one") + frame(b"", True) + frame(b"three")[:6]
    messages, rest = split_messages(stream)
    assert [(m.compressed, m.payload) for m in messages] == [(False, b"one"), (True, b"")]
    assert rest == frame(b"three")[:6]
    messages, rest = split_messages(rest + frame(b"three")[6:])
    assert [m.payload for m in messages] == [b"three"] and rest == b""
    assert split_messages(b"\x00\x00") == ([], b"\x00\x00")
    with pytest.raises(ValueError, match="flag"):
        split_messages(b"\x02\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="limit"):
        split_messages(frame(b"x" * 11), max_size=10)


@pytest.mark.parametrize("service", ["", "greeter.Greeter", "a" * 200])
def test_health_request_matches_protobuf(service):
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert health_request(service) == frame(expected)
    if not service:
        assert health_request(service) == bytes(5)


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_health_status_matches_protobuf(status):
    assert health_status(health_pb2.HealthCheckResponse(status=status).SerializeToString()) == status


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"", 0),
        (b"\x08\x01", 1),
        (b"\x08\x02", 2),
        (b"\x12\x03abc\x08\x01", 1),  # an unknown length-delimited field first
        (b"\x08\x02\x08\x01", 1),  # the last occurrence wins
        (b"\x18\x96\x01\x08\x03", 3),  # an unknown varint field with a two-byte value
        (b"\x08", None),  # truncated varint
        (b"\x0a\x01x", None),  # field 1 with the wrong wire type
        (b"\x12\x05ab", None),  # length past the end
        (b"\x0f", None),  # wire type 7
    ],
)
def test_health_status_decoding(payload, status):
    assert health_status(payload) == status


# -- check_health against real servers --------------------------------------------------


@pytest.fixture
async def grpc_server():
    """A grpc.aio server on 127.0.0.1 with the health service: (port, servicer)."""
    server = grpc.aio.server()
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port, servicer
    await server.stop(None)


async def test_check_health_serving_and_not_serving(grpc_server):
    port, servicer = grpc_server
    assert await check_health("127.0.0.1", port, "", 2.0) == HealthAnswer(0, "", 1)
    await servicer.set("", NOT_SERVING)
    assert await check_health("127.0.0.1", port, "", 2.0) == HealthAnswer(0, "", 2)


async def test_check_health_named_service(grpc_server):
    port, servicer = grpc_server
    await servicer.set("greeter.Greeter", NOT_SERVING)
    assert (await check_health("127.0.0.1", port, "greeter.Greeter", 2.0)).serving == 2
    await servicer.set("greeter.Greeter", SERVING)
    assert (await check_health("127.0.0.1", port, "greeter.Greeter", 2.0)).serving == 1
    unknown = await check_health("127.0.0.1", port, "nobody.Here", 2.0)
    assert unknown.grpc_status == Status.NOT_FOUND and unknown.serving is None


async def test_check_health_without_the_health_service_is_unimplemented():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        answer = await check_health("127.0.0.1", port, "", 2.0)
    finally:
        await server.stop(None)
    assert answer.grpc_status == Status.UNIMPLEMENTED and answer.serving is None


async def test_check_health_closed_port_is_oserror():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        await check_health("127.0.0.1", port, "", 1.0)


async def raw_server(answer: bytes | None):
    """A TCP server that reads the call and sends `answer` (None: never answers, reads to
    EOF); returns (server, an event set once the connection is closed on its side)."""
    closed = asyncio.Event()

    async def handle(reader, writer):
        try:
            if answer is None:
                await reader.read()
            else:
                await reader.read(100)
                writer.write(answer)
        finally:
            writer.close()
            await writer.wait_closed()
            closed.set()

    return await asyncio.start_server(handle, "127.0.0.1", 0), closed


async def test_check_health_silent_server_times_out():
    server, closed = await raw_server(None)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    async with server:
        with pytest.raises(TimeoutError):
            await check_health("127.0.0.1", port, "", 0.3)
        assert 0.25 < time.monotonic() - started < 1.0
        await asyncio.wait_for(closed.wait(), 1.0)  # the probe closed its connection


async def test_check_health_http1_server_is_a_protocol_error():
    server, closed = await raw_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(GrpcProbeError, match="HTTP/2"):
            await check_health("127.0.0.1", port, "", 1.0)
        await asyncio.wait_for(closed.wait(), 1.0)


@pytest.mark.parametrize(
    ("misbehave", "error"), [("503", "HTTP status 503"), ("reset", "reset the stream"), ("goaway", "GOAWAY")]
)
async def test_check_health_http2_answers_that_are_not_grpc(misbehave, error):
    closed = asyncio.Event()

    async def handle(reader, writer):
        conn = jh2.connection.H2Connection(jh2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, jh2.events.StreamEnded):
                        if misbehave == "503":
                            conn.send_headers(event.stream_id, [(":status", "503")], end_stream=True)
                        elif misbehave == "reset":
                            conn.reset_stream(event.stream_id)
                        else:
                            conn.close_connection(error_code=2)
                writer.write(conn.data_to_send())
        except jh2.exceptions.ProtocolError:
            pass  # after our GOAWAY the state machine refuses the client's last frames
        finally:
            writer.close()
            await writer.wait_closed()
            closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        with pytest.raises(GrpcProbeError, match=error):
            await check_health("127.0.0.1", server.sockets[0].getsockname()[1], "", 1.0)
        await asyncio.wait_for(closed.wait(), 1.0)  # the probe closed its connection
