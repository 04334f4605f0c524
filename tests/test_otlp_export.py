"""Spans reach an OTLP/HTTP collector (a real receiver on loopback) when
OTEL_EXPORTER_OTLP_ENDPOINT is set and the OpenTelemetry SDK is installed."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import http, wait_for

pytest.importorskip("opentelemetry.sdk", reason="the OTLP export is an extra: pip install '.[otlp]'")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)


class Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.spans: list = []
        super().__init__(("127.0.0.1", 0), _Receiver)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Receiver(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.server.spans.extend(scope_spans.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_both_hops_export_their_span_with_the_callers_trace_id(start_app, start_sidecar):
    collector = Collector()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        far = start_app("far")
        start_sidecar(far.port, "--name", "far", env=env)
        near_app = start_app("near")
        near = start_sidecar(near_app.port, "--name", "near", env=env)
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = f"00-{trace_id}-00f067aa0ba902b7-01"
        assert http("GET", f"{near.outbound}/far/x", headers={"traceparent": parent})[0] == 200

        def ours() -> list:
            return [s for s in collector.spans if s.trace_id.hex() == trace_id]

        wait_for(lambda: len(ours()) >= 2, 15, what="two spans of the trace at the collector")
        kinds = {s.kind for s in ours()}
        assert len(kinds) == 2  # the outbound hop (client) and the inbound hop (server)
    finally:
        collector.shutdown()
        collector.server_close()
