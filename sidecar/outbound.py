"""The outbound listener: app -> sidecar -> a healthy instance of a service, by name.

Three ways to name the service (see the README): a path prefix (`/orders/v1/items`), the
Host header (`Host: orders`) or an HTTP proxy absolute-form target
(`GET http://orders/v1/items`). A name is only ever looked up in the registry: an
address taken from the request is never dialled.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from multidict import CIMultiDict

from . import tracing
from .balancer import Balancer, Outcome
from .config import MtlsMode
from .deadline import Deadline
from .deadline import from_headers as deadline_from
from .discovery import PANIC_HEADER, Discovery
from .errors import (
    ERROR_HEADER,
    AppProtocolMismatch,
    BadRequest,
    ClientClosed,
    IdentityUnavailableError,
    MisdirectedRequest,
    PeerWithoutMtls,
    SidecarError,
    UnknownService,
    UpstreamTimeout,
    error_response,
)
from .forward import Forwarder, ForwardError, Protocol, te_trailers
from .http.h2_server import HTTP2
from .http.headers import REQUEST_ID, request_headers
from .http.messages import Request, Response
from .http.tls import ClientTLS
from .http.tunnel import is_upgrade, tunnel
from .identity.keeper import IdentityKeeper
from .observe import Observer
from .registry.base import H2_META, MTLS_META, Instance
from .retry import (
    GRPC_REPLAY_LIMIT,
    NEVER_SENT,
    REPLAY_LIMIT,
    FailureKind,
    ReplayBuffer,
    RetryBudget,
    backoff_delay,
    grpc_failure,
    grpc_unavailable,
    response_failure,
    retry_eligible,
)

# How many times a gRPC call was tried before, for the server (gRPC's retry design, A6).
PREVIOUS_ATTEMPTS = "grpc-previous-rpc-attempts"

# Retries of requests that never reached an app, on top of --retries (they spend no
# budget): enough to step over a few dead instances that are still registered.
MAX_UNSENT_RETRIES = 4

_SERVICE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


# Names that are never a mesh service: Consul registers its own servers as "consul",
# and calling the registry through the mesh would hand apps its API.
RESERVED_NAMES = frozenset({"localhost", "consul"})


def _is_service_name(host: str) -> bool:
    # The pattern has no '.' and no ':', so no IPv4 or IPv6 literal can pass it; names
    # are only ever looked up in the registry anyway, never resolved.
    return bool(host) and host not in RESERVED_NAMES and _SERVICE_RE.match(host) is not None


def _split_host(authority: str) -> str:
    """Host name from `host[:port]`, lower-cased (IPv6 literals come back with brackets)."""
    if authority.startswith("["):
        return authority.lower()
    return authority.rsplit(":", 1)[0].lower() if authority.count(":") == 1 else authority.lower()


def parse_target(raw_target: str, host_header: str | None) -> tuple[str, str]:
    """(service name, path to send) for one outbound request. Pure; raises SidecarError."""
    if "#" in raw_target:
        raise BadRequest("a request target must not contain a fragment")
    if raw_target.startswith(("http://", "https://")):
        scheme_end = raw_target.index("://") + 3
        slash = raw_target.find("/", scheme_end)
        query = raw_target.find("?", scheme_end)
        cut = min(x for x in (slash, query, len(raw_target)) if x != -1)
        authority = raw_target[scheme_end:cut]
        path = raw_target[cut:] or "/"
        if not path.startswith("/"):
            path = "/" + path
        if "@" in authority:
            raise BadRequest("userinfo is not allowed in the request target")
        host = _split_host(authority)
        if not _is_service_name(host):
            raise MisdirectedRequest(
                f"{host!r} is not a service name; only registered services can be called"
            )
        if host_header is not None and _split_host(host_header) != host:
            raise BadRequest("the Host header disagrees with the request target")
        return host, path
    if not raw_target.startswith("/"):
        raise BadRequest("the request target must be a path or an absolute URL")
    if host_header is not None:
        host = _split_host(host_header)
        if _is_service_name(host):
            return host, raw_target
    # path-prefix form: /<service>/rest
    rest = raw_target[1:]
    cut = min(x for x in (rest.find("/"), rest.find("?"), len(rest)) if x != -1)
    name = rest[:cut].lower()
    path = rest[cut:] or "/"
    if not path.startswith("/"):
        path = "/" + path
    if not _is_service_name(name):
        raise MisdirectedRequest(
            "name the service: GET /<service>/<path>, Host: <service>, or a proxy request to http://<service>/"
        )
    return name, path


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 2  # attempts beyond the first
    per_try_timeout: float | None = None
    request_timeout: float = 30.0
    budget_ratio: float = 0.2
    budget_min_per_second: float = 3.0


class Outbound:
    """app -> a healthy instance of the named service, with retries inside one deadline."""

    def __init__(
        self,
        name: str,
        discovery: Discovery,
        forwarder: Forwarder,
        balancer: Balancer,
        policy: RetryPolicy,
        observer: Observer,
        connect_timeout: float = 2.0,
        tunnel_idle_timeout: float = 300.0,
        mtls: MtlsMode = "off",
        keeper: IdentityKeeper | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.tunnel_idle_timeout = tunnel_idle_timeout
        self.mtls = mtls
        self.keeper = keeper
        self.name = name
        self.discovery = discovery
        self.forwarder = forwarder
        self.balancer = balancer
        self.policy = policy
        self.observer = observer
        self.metrics = observer.metrics
        self._in_flight = observer.metrics.in_flight("outbound", "all")  # one series: looked up once
        self.budgets: dict[str, RetryBudget] = {}
        self.requests = 0

    def __repr__(self) -> str:
        return f"<Outbound requests={self.requests} active={self.forwarder.active} {self.balancer!r}>"

    def budget(self, service: str) -> RetryBudget:
        budget = self.budgets.get(service)
        if budget is None:
            budget = RetryBudget(
                self.policy.budget_ratio, min_retries_per_second=self.policy.budget_min_per_second
            )
            self.budgets[service] = budget
        return budget

    def handler_for(self, service: str) -> Callable[[Request], Awaitable[Response]]:
        """The handler of an --upstream port: every request goes to `service`, with its
        target's path and query as they are (the rules of the outbound listener hold)."""

        async def handle(request: Request) -> Response:
            return await self.handle(request, service)

        return handle

    async def handle(self, request: Request, fixed: str | None = None) -> Response:
        self.requests += 1
        started = time.monotonic()
        trace = tracing.from_headers(request.headers)
        deadline = deadline_from(request.headers, self.policy.request_timeout, started, request.grpc)
        service = "-"
        call = _Call()
        with self._in_flight:
            try:
                if fixed is None:
                    service, path = parse_target(request.raw_path, request.headers.get("Host"))
                else:
                    service, path = fixed, request.path_qs
                response = await self._call(request, service, path, deadline, trace, call)
            except SidecarError as err:
                if isinstance(err, (UnknownService, BadRequest, MisdirectedRequest)):
                    service = "-"  # a name nobody registered never becomes a metric label
                response = error_response(err, self.name, request.headers.get(REQUEST_ID), grpc=request.grpc)
            except asyncio.CancelledError:
                # the client left: the listener cancelled the call and every attempt with it
                self._finished(request, ClientClosed.status, started, trace, service, call)
                raise
        self._finished(request, response.status, started, trace, service, call, response.grpc_status)
        return response

    def _finished(
        self,
        request: Request,
        status: int,
        started: float,
        trace: tracing.TraceContext,
        service: str,
        call: _Call,
        grpc_status: str | None = None,
    ) -> None:
        self.observer.finished(
            "outbound",
            request,
            status,
            started,
            trace,
            service=service,
            instance=call.instance,
            request_id=call.request_id or request.headers.get(REQUEST_ID),
            attempts=call.attempts,
            grpc_status=grpc_status,
        )

    async def _call(
        self,
        request: Request,
        service: str,
        path: str,
        deadline: Deadline,
        trace: tracing.TraceContext,
        call: _Call,
    ) -> Response:
        instances = await self.discovery.resolve(service)
        headers, call.request_id = request_headers(request, host=service)
        headers.update(trace.headers())
        budget = self.budget(service)
        budget.record_request()
        if is_upgrade(request):
            return await self._tunnel(request, service, path, instances, headers, deadline, call)
        limited = self.forwarder.body(request)
        limit = GRPC_REPLAY_LIMIT if request.grpc else REPLAY_LIMIT
        body = ReplayBuffer(limited, limit) if limited is not None else None
        te = request.version == HTTP2 and (request.grpc or te_trailers(request))
        tried: set[str] = set()
        tries = _Tries()
        while True:
            call.attempts += 1
            now = time.monotonic()
            if deadline.expired(now):
                raise UpstreamTimeout(f"the deadline for calling {service!r} passed")
            if call.attempts > 1:
                # the live set: an instance ejected, gone or joined since the last try counts
                instances = self.discovery.current(service)
            self._panic_header(service, headers, call.attempts > 1)
            if request.grpc and call.attempts > 1:
                headers[PREVIOUS_ATTEMPTS] = str(call.attempts - 1)
            lease = self.balancer.acquire(service, instances, exclude=tried)
            tried.add(lease.instance.id)
            call.instance = lease.instance.id
            headers.update(deadline.outgoing_headers(now))
            timeout = deadline.try_timeout(self.policy.per_try_timeout, now)
            # The caller's impatience is not the instance's fault: an attempt cut short by
            # a deadline the caller (or the previous hop) asked for is not charged to it.
            per_try = self.policy.per_try_timeout or math.inf
            cut_by_caller = deadline.source != "config" and timeout is not None and timeout < per_try
            everyone_tried = len(tried) >= len(instances)
            outcome: Outcome = "cancelled"
            retry: FailureKind | None = None
            try:
                try:
                    upstream = await self.forwarder.open(
                        request.method,
                        lease.instance.endpoint,
                        path,
                        headers,
                        body.body() if body else None,
                        timeout,
                        self._tls_for(lease.instance),
                        self._protocol_for(request, lease.instance),
                        te,
                    )
                except ForwardError as err:
                    broken = limited.broken() if limited is not None else None
                    if broken is not None:  # the caller broke a limit or left: not the instance
                        raise broken from err
                    kind = _failure_kind(err)
                    # (a connect or a wait cut by the caller's deadline is a timeout too)
                    caller_cut = cut_by_caller and isinstance(err.error, UpstreamTimeout)
                    outcome = "cancelled" if caller_cut else _outcome(err)
                    if err.kind != "refused" and self._may_retry(
                        request, service, budget, deadline, tries, kind, None, body, everyone_tried
                    ):
                        retry = kind
                        continue
                    raise err.error from err
                failure = response_failure(upstream.status, upstream.headers)
                if request.grpc and failure is None:
                    failure = grpc_failure(upstream.headers, upstream.content.is_eof())
                # the next hop may have run out of the caller's budget: not the instance's fault
                answered: Outcome = (
                    "cancelled"
                    if cut_by_caller and upstream.headers.get(ERROR_HEADER) == UpstreamTimeout.code
                    else upstream.status
                )
                outcome = 503 if failure == "unavailable" else answered
                if failure is not None and self._may_retry(
                    request, service, budget, deadline, tries, failure, upstream.status, body, everyone_tried
                ):
                    self.forwarder.discard(upstream)
                    retry = failure
                    continue
                outcome = "cancelled"  # until the answer is relayed
                response = await self.forwarder.relay(request, upstream, call.request_id, limited)
                outcome = answered
                if request.grpc and grpc_unavailable(getattr(upstream, "trailers", None)):
                    outcome = 503  # a gRPC UNAVAILABLE counts against the instance, like a 503
                return response
            finally:
                self.balancer.release(lease, outcome)
                if retry is not None and retry not in NEVER_SENT:
                    # a never-sent request goes to the next instance at once; a real retry
                    # waits a little, so that retries do not arrive in lockstep
                    await asyncio.sleep(backoff_delay(tries.sent))

    def _panic_header(self, service: str, headers: CIMultiDict[str], again: bool = False) -> None:
        """Tell the peer sidecar to forward even though its app fails its health checks,
        when every instance of the service does (the panic rule, see discovery). `again`:
        a retry, whose headers may carry the previous attempt's (request_headers drops
        every X-Sidecar- header a caller sent)."""
        if self.discovery.panic(service):
            headers[PANIC_HEADER] = "1"
        elif again:
            headers.popall(PANIC_HEADER, None)

    async def _tunnel(
        self,
        request: Request,
        service: str,
        path: str,
        instances: tuple[Instance, ...],
        headers: CIMultiDict[str],
        deadline: Deadline,
        call: _Call,
    ) -> Response:
        """A WebSocket upgrade: one attempt (the client waits on the handshake), and the open
        tunnel counts as an outstanding request of the endpoint for its whole life."""
        self._panic_header(service, headers)
        lease = self.balancer.acquire(service, instances)
        call.instance, call.attempts = lease.instance.id, 1
        now = time.monotonic()
        headers.update(deadline.outgoing_headers(now))
        outcome: Outcome = "cancelled"
        try:
            tls = self._tls_for(lease.instance)
        except (ForwardError, SidecarError) as err:  # not the instance's doing
            self.balancer.release(lease, outcome)
            raise err.error if isinstance(err, ForwardError) else err from None
        try:
            response = await tunnel(
                request,
                lease.instance.endpoint,
                path,
                headers,
                call.request_id or "",
                connect_timeout=self.connect_timeout,
                response_timeout=deadline.try_timeout(self.policy.per_try_timeout, now)
                or self.policy.request_timeout,
                idle_timeout=self.tunnel_idle_timeout,
                tls=tls,
            )
            outcome = response.status
            return response
        except UpstreamTimeout:
            outcome = "timeout"
            raise
        except SidecarError:
            outcome = "connect_failure"
            raise
        finally:
            self.balancer.release(lease, outcome)

    def _protocol_for(self, request: Request, instance: Instance) -> Protocol:
        """HTTP/2 to a peer sidecar for an HTTP/2 request (gRPC needs it), HTTP/1.1 for the
        rest; a peer too old for HTTP/2 gets plain requests over HTTP/1.1 and no gRPC."""
        if request.version != HTTP2:
            return "http1"
        if instance.meta.get(H2_META) == "1":
            return "h2"
        if request.grpc:
            refused = AppProtocolMismatch(
                f"{instance.endpoint}'s sidecar does not take HTTP/2 (gRPC needs it)"
            )
            raise ForwardError("unsent", refused)
        return "http1"

    def _tls_for(self, instance: Instance) -> ClientTLS | None:
        """How to reach `instance`: mutual TLS when it says it speaks it (its registration's
        `mtls` meta) and we do; plaintext to a sidecar that does not yet (an upgrade in
        progress), except in strict mode, where that instance is skipped as never sent."""
        if self.mtls == "off":
            return None
        if instance.meta.get(MTLS_META, "off") == "off":
            if self.mtls == "strict":
                refused = PeerWithoutMtls(f"{instance.endpoint} does not speak mutual TLS (--mtls strict)")
                raise ForwardError("unsent", refused)
            return None
        tls = self.keeper.client(instance.name) if self.keeper is not None else None
        if tls is None:
            raise IdentityUnavailableError("this sidecar has no valid certificate for mutual TLS now")
        return tls

    def _may_retry(
        self,
        request: Request,
        service: str,
        budget: RetryBudget,
        deadline: Deadline,
        tries: _Tries,
        kind: FailureKind,
        status: int | None,
        body: ReplayBuffer | None,
        everyone_tried: bool,
    ) -> bool:
        """Whether to try again after a failed attempt, counting the attempt in `tries`.

        A request that never reached an app may go to another instance whatever its
        method, without spending `--retries` or the retry budget (it cost no app any
        work), up to MAX_UNSENT_RETRIES times; every other retry spends both.
        """
        if deadline.expired(time.monotonic()):
            return False
        replayable = body is None or body.replayable
        if not retry_eligible(request.method, request.headers, kind, status, replayable):
            return False
        if kind in NEVER_SENT:
            tries.unsent += 1
            if tries.unsent > MAX_UNSENT_RETRIES or everyone_tried:
                return False  # (not once more to an instance that just turned it away)
            self.metrics.inc_retry(service)
            return True
        tries.sent += 1
        if tries.sent > self.policy.retries:
            return False
        if not budget.can_retry():
            self.metrics.inc_budget_exhausted(service)
            return False
        budget.record_retry()
        self.metrics.inc_retry(service)
        return True


class _Tries:
    """Retries one call has made: of requests that may have reached an app, and of ones
    that cannot have."""

    __slots__ = ("sent", "unsent")

    def __init__(self) -> None:
        self.sent = 0
        self.unsent = 0


class _Call:
    """What one outbound call did, for the access log."""

    __slots__ = ("attempts", "instance", "request_id")

    def __init__(self) -> None:
        self.attempts = 0
        self.instance: str | None = None
        self.request_id: str | None = None


_FAILURE_KINDS: dict[str, FailureKind] = {
    "timeout": "timeout",
    "connect_failure": "connect_failure",
    "unsent": "reset_before_send",
}


def _failure_kind(err: ForwardError) -> FailureKind:
    return _FAILURE_KINDS.get(err.kind, "reset")


def _outcome(err: ForwardError) -> Outcome:
    """What the attempt says about the instance: nothing when the sidecar refused the
    request or never sent it for reasons of its own (a full pool, a closed connection)."""
    if err.kind in ("refused", "unsent"):
        return "cancelled"
    return _failure_kind(err)
