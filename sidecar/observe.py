"""What the sidecar records about each finished request, for both listeners: the metrics,
the access-log line and (when OTLP export is on) the hop's span."""

from __future__ import annotations

import time

from .accesslog import AccessLog
from .http.messages import Request
from .metrics import Metrics
from .tracing import FinishedSpan, SpanExporter, TraceContext

_PROTOCOLS = {(2, 0): "HTTP/2", (1, 1): "HTTP/1.1", (1, 0): "HTTP/1.0"}


class Observer:
    def __init__(self, metrics: Metrics, access_log: AccessLog, exporter: SpanExporter | None = None) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self._logging = access_log.enabled
        self.exporter = exporter

    def __repr__(self) -> str:
        return f"<Observer {self.access_log!r} export={'on' if self.exporter else 'off'}>"

    def finished(
        self,
        direction: str,
        request: Request,
        status: int,
        started: float,
        trace: TraceContext,
        *,
        service: str,
        instance: str | None,
        request_id: str | None,
        attempts: int = 1,
        caller: str | None = None,
        grpc_status: str | None = None,
    ) -> None:
        """Record one request that `started` (monotonic seconds) and ended now with `status`
        (and, for a gRPC call, `grpc_status`: None when it ended without one)."""
        duration = time.monotonic() - started
        self.metrics.observe_request(direction, service, request.method, status, duration)
        grpc = request.grpc
        if grpc:
            self.metrics.observe_grpc(direction, service, grpc_status)
        if self._logging:
            self.access_log.log(
                direction=direction,
                method=request.method,
                target=request.raw_path,
                status=status,
                duration=duration,
                service=service,
                instance=instance,
                attempts=attempts,
                request_id=request_id,
                trace_id=trace.trace_id,
                caller=caller,
                protocol=_PROTOCOLS.get(request.version, "HTTP/1.1"),
                grpc_status=grpc_status if grpc else None,
            )
        if self.exporter is not None:
            end_ns = time.time_ns()
            self.exporter.export(
                FinishedSpan(
                    context=trace,
                    name=f"{request.method} {service}",
                    kind="server" if direction == "inbound" else "client",
                    start_ns=end_ns - int(duration * 1e9),
                    end_ns=end_ns,
                    attributes={
                        "http.request.method": request.method,
                        "http.response.status_code": status,
                        "sidecar.direction": direction,
                        "sidecar.attempts": attempts,
                        "network.protocol.version": "2" if request.version == (2, 0) else "1.1",
                        **({"rpc.grpc.status_code": int(grpc_status)} if grpc and grpc_status else {}),
                    },
                    error=status >= 500,
                )
            )
