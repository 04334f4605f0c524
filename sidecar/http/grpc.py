"""gRPC over HTTP/2, the parts a proxy and a health probe need (PROTOCOL-HTTP2.md of grpc/grpc):
the content type, the status codes, the `grpc-timeout` and `grpc-message` header encodings,
the 5-byte message framing, and one call of grpc.health.v1.Health/Check over h2c.

Rules of this file:
- only the standard library, jh2 and the protocol wing: no proxy, no config, no protobuf
  (the two health messages are small enough to encode by hand);
- the parsers never raise on what a peer sent: a malformed value reads as None;
- gRPC-Web (`application/grpc-web*`) is not gRPC here: it runs over HTTP/1.1 and carries its
  trailers in the body, so a proxy must not treat it as HTTP/2 gRPC.
"""

from __future__ import annotations

import asyncio
import enum
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote

import jh2.config
import jh2.connection
import jh2.events
import jh2.exceptions

HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
# A health answer is a few bytes; anything much larger is not one.
MAX_HEALTH_BODY = 64 * 1024


class Status(enum.IntEnum):
    """The gRPC status codes (doc/statuscodes.md of grpc/grpc)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ServingStatus(enum.IntEnum):
    """grpc.health.v1.HealthCheckResponse.ServingStatus."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3


class GrpcProbeError(Exception):
    """The app answered the health call, but not with a gRPC answer (an HTTP status other
    than 200, a reset stream, a GOAWAY, bytes that are not HTTP/2 or not gRPC)."""


def is_grpc(content_type: str | None) -> bool:
    """Whether a Content-Type is gRPC over HTTP/2: `application/grpc`, optionally with a
    `+format` suffix or parameters, in any case; `application/grpc-web*` is not."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/grpc" or media.startswith("application/grpc+")


# -- grpc-timeout ------------------------------------------------------------------

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_MAX_DIGITS = 99_999_999
_NS_PER = (("H", 3600 * 10**9), ("M", 60 * 10**9), ("S", 10**9), ("m", 10**6))


def parse_timeout(value: str | None) -> float | None:
    """A `grpc-timeout` value (1 to 8 ASCII digits and a unit of H M S m u n) in seconds;
    None when absent or malformed."""
    match = _TIMEOUT.fullmatch(value) if value else None
    if match is None:
        return None
    return int(match[1]) * _UNITS[match[2]]


def format_timeout(seconds: float) -> str:
    """`seconds` as a `grpc-timeout` value, rounded down: milliseconds, written in the
    coarsest unit that holds them exactly (`1500m`, `2S`), coarser still when they need more
    than 8 digits, and `u` or `n` below a millisecond so that a positive budget never reads
    as 0. A budget of 0 or less is `0n` (already expired)."""
    if not seconds > 0:  # also NaN
        return "0n"
    # whole nanoseconds first, so that float noise (1.001 * 1e3 = 1000.99...) loses no unit
    ns = max(1, round(min(seconds, 1e15) * 1e9))
    if ns < 10**6:
        return f"{ns // 1000}u" if ns >= 1000 else f"{ns}n"
    ms = ns // 10**6 * 10**6
    for unit, size in _NS_PER:  # coarsest first: the shortest exact spelling
        if ms % size == 0 and ms // size <= _MAX_DIGITS:
            return f"{ms // size}{unit}"
    for unit, size in reversed(_NS_PER):  # too long for milliseconds: the finest that fits
        if ns // size <= _MAX_DIGITS:
            return f"{ns // size}{unit}"
    return f"{_MAX_DIGITS}H"


# -- grpc-message ------------------------------------------------------------------


def encode_message(text: str) -> str:
    """`grpc-message` encoding: the UTF-8 bytes, with '%' and every byte outside
    0x20-0x7E percent-encoded."""
    data = text.encode("utf-8", "replace")
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in data)


def decode_message(value: str) -> str:
    """The text of a `grpc-message` value; a '%' not followed by two hex digits stays as
    it is and invalid UTF-8 becomes U+FFFD, as the spec asks of a receiver."""
    return unquote(value, errors="replace")


# -- message framing ---------------------------------------------------------------


class Message(NamedTuple):
    compressed: bool
    payload: bytes


_PREFIX = struct.Struct(">BI")


def frame(payload: bytes, compressed: bool = False) -> bytes:
    """One length-prefixed message: a compressed flag byte, a 4-byte big-endian length."""
    return _PREFIX.pack(1 if compressed else 0, len(payload)) + payload


def split_messages(buf: bytes, max_size: int = 4 * 1024 * 1024) -> tuple[list[Message], bytes]:
    """The whole messages at the start of `buf` and the bytes left after them. Raises
    ValueError on a flag byte other than 0 or 1, or a message longer than `max_size`."""
    messages: list[Message] = []
    at = 0
    while len(buf) - at >= _PREFIX.size:
        flag, length = _PREFIX.unpack_from(buf, at)
        if flag > 1:
            raise ValueError(f"gRPC message flag {flag} is neither 0 nor 1")
        if length > max_size:
            raise ValueError(f"gRPC message of {length} bytes is over the {max_size}-byte limit")
        end = at + _PREFIX.size + length
        if end > len(buf):
            break
        messages.append(Message(bool(flag), bytes(buf[at + _PREFIX.size : end])))
        at = end
    return messages, bytes(buf[at:])


# -- grpc.health.v1 ----------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 70:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def health_request(service: str) -> bytes:
    """A framed HealthCheckRequest (field 1: the service name; "" is the whole server)."""
    name = service.encode()
    return frame(b"\x0a" + _varint(len(name)) + name if name else b"")


def health_status(message: bytes) -> int | None:
    """HealthCheckResponse.status (field 1, a varint) of one message's payload (without its
    5-byte prefix): 0 when the field is absent (proto3 default, UNKNOWN); None if malformed."""
    status, at = 0, 0
    try:
        while at < len(message):
            key, at = _read_varint(message, at)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, at = _read_varint(message, at)
                if field == 1:
                    status = value - (1 << 64) if value >= 1 << 63 else value  # int32 enum
            elif field == 1:
                return None  # field 1 is a varint; any other wire type is not this message
            elif wire == 1 or wire == 5:
                at += 8 if wire == 1 else 4
            elif wire == 2:
                length, at = _read_varint(message, at)
                at += length
            else:
                return None
        return status if at == len(message) else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class HealthAnswer:
    grpc_status: int
    grpc_message: str
    serving: int | None  # the HealthCheckResponse status; None without a (valid) message


async def check_health(host: str, port: int, service: str, timeout: float) -> HealthAnswer:
    """One call of grpc.health.v1.Health/Check over h2c (prior knowledge) on a new connection,
    closed afterwards. Raises TimeoutError past `timeout`, OSError when the connection is
    refused or lost before the answer ended, GrpcProbeError when the answer is not gRPC."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            return await _health_call(reader, writer, host, port, service, timeout)
        finally:
            writer.close()


async def _health_call(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
    service: str,
    timeout: float,
) -> HealthAnswer:
    conn = jh2.connection.H2Connection(jh2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", HEALTH_CHECK_PATH.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", format_timeout(timeout).encode()),
    ]
    conn.send_headers(stream, headers)
    conn.send_data(stream, health_request(service), end_stream=True)
    writer.write(conn.data_to_send())
    fields: dict[bytes, bytes] = {}  # response headers, then trailers (or trailers-only)
    body = bytearray()
    first = b""  # the server's preface must open with a SETTINGS frame (type 4, 4th byte)
    ended = False
    while not ended:
        data = await reader.read(65536)
        if len(first) < 4:
            first += data[: 4 - len(first)]
            if (len(first) == 4 and first[3] != 4) or (first and not data):
                raise GrpcProbeError(f"{authority} did not answer in HTTP/2: {first!r}...")
        if not data:
            raise ConnectionResetError(f"{authority} closed the connection before the answer ended")
        try:
            received = conn.receive_data(data)
        except jh2.exceptions.ProtocolError as exc:
            raise GrpcProbeError(f"{authority} did not answer in HTTP/2: {exc}") from exc
        for event in received:
            if isinstance(event, jh2.events.ResponseReceived | jh2.events.TrailersReceived):
                fields.update((bytes(k), bytes(v)) for k, v in event.headers)
                status = fields.get(b":status", b"")
                if status != b"200":
                    raise GrpcProbeError(f"{authority} answered HTTP status {status.decode('latin-1')}")
            elif isinstance(event, jh2.events.DataReceived) and event.stream_id == stream:
                body += event.data or b""
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
                if len(body) > MAX_HEALTH_BODY:
                    raise GrpcProbeError(f"{authority} sent over {MAX_HEALTH_BODY} bytes of health answer")
            elif isinstance(event, jh2.events.StreamEnded) and event.stream_id == stream:
                ended = True
            # a reset or GOAWAY after the stream ended (a server closing down) loses nothing
            elif isinstance(event, jh2.events.StreamReset) and not ended:
                raise GrpcProbeError(f"{authority} reset the stream (error code {event.error_code})")
            elif isinstance(event, jh2.events.ConnectionTerminated) and not ended:
                raise GrpcProbeError(f"{authority} sent GOAWAY (error code {event.error_code})")
        writer.write(conn.data_to_send())
    conn.close_connection()
    writer.write(conn.data_to_send())
    return _answer(authority, fields, bytes(body))


def _answer(authority: str, fields: dict[bytes, bytes], body: bytes) -> HealthAnswer:
    raw = fields.get(b"grpc-status", b"")
    if not raw.isdigit():
        raise GrpcProbeError(f"{authority} answered without a valid grpc-status ({raw!r})")
    try:
        messages, rest = split_messages(body, MAX_HEALTH_BODY)
    except ValueError as exc:
        raise GrpcProbeError(f"{authority}: {exc}") from exc
    serving = None
    if messages and not rest and not messages[0].compressed:
        serving = health_status(messages[0].payload)
    message = decode_message(fields.get(b"grpc-message", b"").decode("latin-1"))
    return HealthAnswer(int(raw), message, serving)
