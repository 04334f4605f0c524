"""W3C Trace Context (https://www.w3.org/TR/trace-context/): one span per sidecar hop.

Rules of this file:
- a valid incoming `traceparent` makes this hop a child span: same trace id and flags,
  the caller's span id as parent, a fresh span id; `tracestate` travels unchanged;
- an absent or invalid `traceparent` (bad version, wrong lengths, upper case, all-zero
  ids, several headers) starts a new trace and drops `tracestate`, as the spec asks;
- version 00 must be exactly 55 characters; a higher version is read by its first four
  fields and answered with version 00;
- exporting spans (OTLP) is an optional extra: `span_exporter()` is None unless
  OTEL_EXPORTER_OTLP_ENDPOINT is set and the OpenTelemetry SDK can be imported.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SAMPLED = 0x01
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX


def parse_traceparent(value: str | None) -> tuple[str, str, int] | None:
    """(trace id, parent span id, flags) from a `traceparent` value, or None when invalid."""
    if value is None:
        return None
    value = value.strip(" \t")
    if len(value) < 55:
        return None
    version = value[:2]
    if not _is_hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id, 32) and _is_hex(parent_id, 16) and _is_hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


def _random_hex(rng: random.Random | None, bits: int) -> str:
    while True:
        value = (rng or random).getrandbits(bits)
        if value:  # an all-zero id is invalid
            return f"{value:0{bits // 4}x}"


@dataclass(frozen=True, slots=True)
class TraceContext:
    """This hop's span: `parent_id` is the caller's span (None when this hop started the trace)."""

    trace_id: str
    parent_id: str | None
    span_id: str
    flags: int
    tracestate: str | None = None

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def header(self) -> str:
        """The `traceparent` value naming this span as the parent of the next hop."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def headers(self) -> dict[str, str]:
        """`traceparent` and, when one came in, `tracestate`, to send to the next hop."""
        out = {TRACEPARENT: self.header()}
        if self.tracestate:
            out[TRACESTATE] = self.tracestate
        return out


def new_span(
    traceparent: str | None,
    tracestate: str | None = None,
    *,
    sample_new: bool = True,
    rng: random.Random | None = None,
) -> TraceContext:
    """A child of `traceparent` when it is valid, else the root of a new trace.

    `sample_new`: the sampled flag of a trace started here; `rng` for tests.
    """
    parsed = parse_traceparent(traceparent)
    span_id = _random_hex(rng, 64)
    if parsed is None:
        return TraceContext(_random_hex(rng, 128), None, span_id, SAMPLED if sample_new else 0)
    trace_id, parent_id, flags = parsed
    return TraceContext(trace_id, parent_id, span_id, flags, tracestate or None)


def from_headers(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], *, sample_new: bool = True
) -> TraceContext:
    """This hop's span for a request with `headers` (several traceparent headers: invalid)."""
    if TRACEPARENT not in headers:  # the common case at the edge of the mesh: a new trace
        return TraceContext(_random_hex(None, 128), None, _random_hex(None, 64), SAMPLED if sample_new else 0)
    parents = headers.getall(TRACEPARENT, ())
    traceparent = parents[0] if len(parents) == 1 else None
    states = headers.getall(TRACESTATE, ())
    tracestate = ",".join(states) if states else None
    return new_span(traceparent, tracestate, sample_new=sample_new)


# -- the optional OTLP export ------------------------------------------------------------

SpanKindName = Literal["server", "client"]
Attribute = str | int | float | bool


@dataclass(frozen=True, slots=True)
class FinishedSpan:
    """One hop, ready to export. Times are Unix nanoseconds (`time.time_ns()`)."""

    context: TraceContext
    name: str  # e.g. "GET orders"
    kind: SpanKindName  # server: inbound hop; client: outbound hop
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Attribute] = field(default_factory=dict)
    error: bool = False


class SpanExporter(Protocol):
    def export(self, span: FinishedSpan) -> None:
        """Queue `span` for export; must not block the event loop."""

    def shutdown(self) -> None:
        """Flush what is queued and stop."""


class _OtelExporter:
    """Hands finished hops to the OpenTelemetry SDK's batch processor (a background thread)."""

    def __init__(self, service_name: str, protocol: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        transport = "grpc" if protocol == "grpc" else "http"
        otlp = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.trace_exporter")
        self._resource = Resource.create({"service.name": service_name})
        self._processor = BatchSpanProcessor(otlp.OTLPSpanExporter())
        self.exported = 0

    def __repr__(self) -> str:
        return f"<OtelExporter exported={self.exported}>"

    def export(self, span: FinishedSpan) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        ctx = span.context
        if not ctx.sampled:
            return
        flags = TraceFlags(ctx.flags)
        own = SpanContext(int(ctx.trace_id, 16), int(ctx.span_id, 16), is_remote=False, trace_flags=flags)
        parent = (
            None
            if ctx.parent_id is None
            else SpanContext(int(ctx.trace_id, 16), int(ctx.parent_id, 16), is_remote=True, trace_flags=flags)
        )
        readable = ReadableSpan(
            span.name,
            context=own,
            parent=parent,
            resource=self._resource,
            attributes=dict(span.attributes),
            kind=SpanKind.SERVER if span.kind == "server" else SpanKind.CLIENT,
            status=Status(StatusCode.ERROR if span.error else StatusCode.UNSET),
            start_time=span.start_ns,
            end_time=span.end_ns,
        )
        self._processor.on_end(readable)
        self.exported += 1

    def shutdown(self) -> None:
        self._processor.shutdown()


def span_exporter(service_name: str, environ: Mapping[str, str] | None = None) -> SpanExporter | None:
    """An OTLP span exporter when OTEL_EXPORTER_OTLP_ENDPOINT (or its _TRACES_ variant) is set
    and the OpenTelemetry SDK is importable; None otherwise (the default: no dependency)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    try:
        return _OtelExporter(service_name, protocol)
    except ImportError as exc:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but spans cannot be exported (%s); "
            "install opentelemetry-sdk and opentelemetry-exporter-otlp",
            exc,
        )
        return None
