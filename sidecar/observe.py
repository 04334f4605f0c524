"""What the sidecar records about each finished request, for both listeners: the metrics,
the access-log line and (when OTLP export is on) the hop's span."""

from __future__ import annotations

import time

from .accesslog import AccessLog
from .http.messages import Request
from .metrics import Metrics
from .tracing import FinishedSpan, SpanExporter, TraceContext


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
    ) -> None:
        """Record one request that `started` (monotonic seconds) and ended now with `status`."""
        duration = time.monotonic() - started
        self.metrics.observe_request(direction, service, request.method, status, duration)
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
                    },
                    error=status >= 500,
                )
            )
