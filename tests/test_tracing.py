import importlib.util
import random

import pytest
from multidict import CIMultiDict

from sidecar import tracing
from sidecar.tracing import (
    TRACEPARENT,
    TRACESTATE,
    FinishedSpan,
    TraceContext,
    from_headers,
    new_span,
    parse_traceparent,
    span_exporter,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def test_parse_valid():
    assert parse_traceparent(VALID) == (TRACE, PARENT, 1)
    assert parse_traceparent(f"00-{TRACE}-{PARENT}-00") == (TRACE, PARENT, 0)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # forbidden version
        f"0g-{TRACE}-{PARENT}-01",  # version not hex
        f"00-{TRACE[:-1]}-{PARENT}-01",  # trace id too short
        f"00-{TRACE}0-{PARENT}-01",  # trace id too long
        f"00-{TRACE}-{PARENT[:-1]}-01",  # parent too short
        f"00-{TRACE}-{PARENT}-1",  # flags too short
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex
        f"00_{TRACE}_{PARENT}_01",  # wrong separators
        f"00-{TRACE}-{PARENT}-zz",  # flags not hex
        f"01-{TRACE}-{PARENT}-01x",  # a later version must continue with '-'
    ],
)
def test_parse_rejects_malformed(value):
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_by_its_first_four_fields():
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01-what-the-future-holds") == (TRACE, PARENT, 1)
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01") == (TRACE, PARENT, 1)


def test_child_span_keeps_trace_flags_and_tracestate():
    ctx = new_span(VALID, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", rng=random.Random(3))
    assert ctx.trace_id == TRACE
    assert ctx.parent_id == PARENT
    assert ctx.span_id != PARENT and len(ctx.span_id) == 16 and ctx.span_id != "0" * 16
    assert ctx.flags == 1 and ctx.sampled
    assert ctx.header() == f"00-{TRACE}-{ctx.span_id}-01"
    assert ctx.headers() == {
        TRACEPARENT: ctx.header(),
        TRACESTATE: "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    }


def test_round_trip():
    ctx = new_span(VALID)
    assert parse_traceparent(ctx.header()) == (ctx.trace_id, ctx.span_id, ctx.flags)
    child = new_span(ctx.header())
    assert (child.trace_id, child.parent_id) == (ctx.trace_id, ctx.span_id)


def test_unsampled_flag_is_kept():
    ctx = new_span(f"00-{TRACE}-{PARENT}-00")
    assert not ctx.sampled and ctx.header().endswith("-00")


def test_invalid_or_absent_traceparent_starts_a_new_trace_and_drops_tracestate():
    for bad in (None, "garbage", f"ff-{TRACE}-{PARENT}-01"):
        ctx = new_span(bad, "rojo=1")
        assert ctx.parent_id is None
        assert ctx.trace_id != TRACE and len(ctx.trace_id) == 32
        assert parse_traceparent(ctx.header()) is not None
        assert ctx.tracestate is None and TRACESTATE not in ctx.headers()
        assert ctx.sampled
    assert not new_span(None, sample_new=False).sampled


def test_new_ids_are_random():
    ids = {new_span(None).trace_id for _ in range(100)}
    assert len(ids) == 100


def test_from_headers():
    headers = CIMultiDict([("Traceparent", VALID), ("tracestate", "a=1"), ("TraceState", "b=2")])
    ctx = from_headers(headers)
    assert ctx.parent_id == PARENT
    assert ctx.tracestate == "a=1,b=2"
    twice = CIMultiDict([("traceparent", VALID), ("traceparent", VALID), ("tracestate", "a=1")])
    ctx = from_headers(twice)
    assert ctx.parent_id is None and ctx.tracestate is None
    assert from_headers(CIMultiDict()).parent_id is None
    assert TRACESTATE not in from_headers(CIMultiDict([("traceparent", VALID), ("tracestate", "")])).headers()


def test_trace_context_is_immutable():
    ctx = new_span(None)
    with pytest.raises(AttributeError):
        ctx.flags = 0  # type: ignore[misc]
    assert isinstance(ctx, TraceContext)


# -- the optional OTLP hook --------------------------------------------------------------


def test_no_exporter_without_the_endpoint_env():
    assert span_exporter("web", environ={}) is None


def test_no_exporter_when_disabled():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    assert span_exporter("web", environ=env) is None


def test_no_exporter_when_the_sdk_is_missing(monkeypatch, caplog):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'opentelemetry'")

    monkeypatch.setattr(tracing, "_OtelExporter", missing)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert span_exporter("web", environ=env) is None
    assert "install opentelemetry-sdk" in caplog.text


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry") is None,
    reason="optional extra: opentelemetry-sdk and opentelemetry-exporter-otlp not installed",
)
def test_exporter_hands_spans_with_our_ids_to_the_sdk(monkeypatch):
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    exporter = span_exporter("web", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert exporter is not None
    memory = InMemorySpanExporter()
    exporter._processor = SimpleSpanProcessor(memory)  # type: ignore[attr-defined]
    ctx = new_span(VALID)
    exporter.export(FinishedSpan(ctx, "GET orders", "client", 1_000, 2_000, {"http.status_code": 200}))
    exporter.export(FinishedSpan(new_span(f"00-{TRACE}-{PARENT}-00"), "GET x", "client", 1, 2))  # unsampled
    (span,) = memory.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == TRACE
    assert f"{span.context.span_id:016x}" == ctx.span_id
    assert f"{span.parent.span_id:016x}" == PARENT
    assert span.resource.attributes["service.name"] == "web"
    assert span.attributes["http.status_code"] == 200
    exporter.shutdown()
