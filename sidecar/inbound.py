"""The inbound listener: mesh -> sidecar -> app, gated by the caller's identity and the
app's health.

With mutual TLS on (`--mtls permissive|strict`), the port takes TLS and plaintext alike
(see sidecar.http.listener). A TLS caller is named by its certificate's SPIFFE ID, which
the authorizer (--allow-from, or Consul intentions) judges before the app sees anything:
403 permission_denied. A plaintext caller is let in only in permissive mode (strict: 403
mtls_required). The app learns a verified caller from `X-Sidecar-Caller: <service>` and
`X-Forwarded-Client-Cert` (Envoy's `By=<our URI>;Hash=<sha256 of the caller's
certificate>;URI=<caller URI>`); whatever a caller sent under those names is dropped.

While the app fails its health checks, requests get 503 app_unhealthy, except those that a
caller's sidecar marked `X-Sidecar-Panic: 1` (`PANIC_HEADER`) while the app still answers
its probes (with a failing status): that caller found no instance of this service passing
and routes to all of them (see `sidecar.discovery`), so the request goes to the app
anyway. An app whose probes time out or are refused (hung or dead) is never sent panic
traffic: the caller gets the fast 503 app_unhealthy, which it treats as never sent. The
header, like every X-Sidecar- header, never reaches the app.
"""

from __future__ import annotations

import asyncio
import time

from . import tracing
from .config import AppProtocol, MtlsMode
from .deadline import TIMEOUT_HEADER
from .deadline import from_headers as deadline_from
from .discovery import PANIC_HEADER
from .errors import (
    AppProtocolMismatch,
    AppUnhealthy,
    ClientClosed,
    MtlsRequired,
    PermissionDenied,
    SidecarError,
    error_response,
)
from .forward import Forwarder, Protocol
from .health import HealthChecker
from .http.headers import REQUEST_ID, request_headers
from .http.messages import Request, Response
from .http.tls import PeerCertificate
from .http.tunnel import is_upgrade, tunnel
from .identity.base import Authorizer, SpiffeId
from .identity.keeper import IdentityKeeper
from .identity.tls import peer_identity
from .observe import Observer
from .registry.base import join_host_port

# The caller's verified service name, for the app (absent for plaintext callers).
CALLER_HEADER = "X-Sidecar-Caller"
# Caller certificates remembered at once (then forgotten all together).
MAX_CALLERS = 1024


class Inbound:
    def __init__(
        self,
        name: str,
        app_host: str,
        app_port: int,
        health: HealthChecker,
        forwarder: Forwarder,
        observer: Observer,
        request_timeout: float,
        connect_timeout: float = 2.0,
        tunnel_idle_timeout: float = 300.0,
        mtls: MtlsMode = "off",
        keeper: IdentityKeeper | None = None,
        authorizer: Authorizer | None = None,
        app_protocol: AppProtocol = "http1",
    ) -> None:
        self.app_protocol = app_protocol
        self._protocol: Protocol = "h2" if app_protocol == "h2c" else "http1"
        self.mtls = mtls
        self.keeper = keeper
        self.authorizer = authorizer
        self.denied = 0
        # per caller certificate (its SHA-256): its identity and the XFCC tail, worked out
        # once, not per request
        self._callers: dict[str, tuple[SpiffeId | None, str]] = {}
        self.connect_timeout = connect_timeout
        self.tunnel_idle_timeout = tunnel_idle_timeout
        self.name = name
        self.app_endpoint = join_host_port(app_host, app_port)
        self.health = health
        self.forwarder = forwarder
        self.observer = observer
        self.metrics = observer.metrics
        self._in_flight = observer.metrics.in_flight("inbound", name)  # one series: looked up once
        self.request_timeout = request_timeout
        self.requests = 0
        self.panic_requests = 0  # let past the health gate by the caller's panic header

    def __repr__(self) -> str:
        return (
            f"<Inbound -> {self.app_endpoint} requests={self.requests} "
            f"panic_requests={self.panic_requests} active={self.forwarder.active}>"
        )

    async def handle(self, request: Request) -> Response:
        self.requests += 1
        started = time.monotonic()
        trace = tracing.from_headers(request.headers)
        deadline = deadline_from(request.headers, self.request_timeout, started, request.grpc)
        caller, xfcc = self._caller(request.peer) if request.peer is not None else (None, "")
        with self._in_flight:
            try:
                if self.mtls != "off":
                    self._admit(request, caller)
                state = self.health.state
                if not state.healthy:
                    if not (state.answering and request.headers.get(PANIC_HEADER) == "1"):
                        raise AppUnhealthy(f"app {self.name!r} is unhealthy: {state.output}")
                    self.panic_requests += 1  # the caller has no passing instance: try the app
                path = request.path_qs  # an absolute-form target: only its path and query
                # The app learns its remaining budget; the sidecar-to-sidecar header stays here.
                if request.grpc and self._protocol != "h2":
                    raise AppProtocolMismatch(
                        f"app {self.name!r} speaks HTTP/1.1 and gRPC needs HTTP/2: "
                        "start its sidecar with --app-protocol h2c"
                    )
                if request.grpc:
                    extra = [*trace.headers().items(), *deadline.app_headers(started)]
                else:
                    extra = [*trace.headers().items(), (TIMEOUT_HEADER, deadline.header_value(started))]
                if caller is not None:
                    extra += self._caller_headers(caller, xfcc)
                if is_upgrade(request):
                    headers, request_id = request_headers(request, None)
                    headers.update(extra)
                    response = await tunnel(
                        request,
                        self.app_endpoint,
                        path,
                        headers,
                        request_id,
                        connect_timeout=self.connect_timeout,
                        response_timeout=deadline.remaining(started),
                        idle_timeout=self.tunnel_idle_timeout,
                    )
                else:
                    response = await self.forwarder.forward(
                        request,
                        self.app_endpoint,
                        path,
                        extra_headers=extra,
                        timeout=deadline.timeout(started) if request.grpc else deadline.remaining(started),
                        protocol=self._protocol,
                    )
            except SidecarError as err:
                response = error_response(err, self.name, request.headers.get(REQUEST_ID), grpc=request.grpc)
            except asyncio.CancelledError:
                # the caller left: the listener cancelled the request, and the app's
                # connection was reset under it
                self._finished(request, ClientClosed.status, started, trace, None, caller)
                raise
        self._finished(
            request, response.status, started, trace, response.request_id, caller, response.grpc_status
        )
        return response

    def _admit(self, request: Request, caller: SpiffeId | None) -> None:
        """Let the verified `caller` (or a plaintext caller, in permissive mode) in, or
        refuse: nothing of a refused request reaches the app."""
        peer = request.peer
        if peer is None:
            if self.mtls == "strict":
                self._deny(MtlsRequired.code)
                raise MtlsRequired(
                    f"service {self.name!r} takes only mutual TLS calls (--mtls strict): "
                    "call it through your own sidecar"
                )
            return
        if caller is None:
            self._deny(PermissionDenied.code)
            raise PermissionDenied("the caller's certificate names no service (one SPIFFE URI SAN expected)")
        if self.authorizer is not None:
            decision = self.authorizer.decide(caller)
            if not decision.allowed:
                self._deny(PermissionDenied.code)
                raise PermissionDenied(f"caller {caller.uri} may not call {self.name!r}: {decision.reason}")

    def _deny(self, code: str) -> None:
        self.denied += 1
        self.metrics.inc_denied(code)

    def _caller(self, peer: PeerCertificate) -> tuple[SpiffeId | None, str]:
        known = self._callers.get(peer.sha256)
        if known is None:
            if len(self._callers) >= MAX_CALLERS:
                self._callers.clear()
            caller = peer_identity(peer)
            tail = f"Hash={peer.sha256};URI={caller.uri}" if caller is not None else ""
            known = self._callers[peer.sha256] = (caller, tail)
        return known

    def _caller_headers(self, caller: SpiffeId, xfcc: str) -> list[tuple[str, str]]:
        """Who called, for the app: the service name, and Envoy's X-Forwarded-Client-Cert.
        (Both are dropped from what the caller sent, with every X-Sidecar- and
        X-Forwarded- header.)"""
        own = self.keeper.spiffe_id if self.keeper is not None else None
        by = f"By={own.uri};" if own is not None else ""
        return [(CALLER_HEADER, caller.service), ("X-Forwarded-Client-Cert", by + xfcc)]

    def _finished(
        self,
        request: Request,
        status: int,
        started: float,
        trace: tracing.TraceContext,
        rid: str | None,
        caller: SpiffeId | None,
        grpc_status: str | None = None,
    ) -> None:
        self.observer.finished(
            "inbound",
            request,
            status,
            started,
            trace,
            service=self.name,
            instance=self.app_endpoint,
            request_id=rid or request.headers.get(REQUEST_ID),
            caller=caller.service if caller is not None else None,
            grpc_status=grpc_status,
        )
