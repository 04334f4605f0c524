"""The outbound listener: app -> sidecar -> a healthy instance of a service, by name.

Three ways to name the service (see the README): a path prefix (`/orders/v1/items`), the
Host header (`Host: orders`) or an HTTP proxy absolute-form target
(`GET http://orders/v1/items`). A name is only ever looked up in the registry: an
address taken from the request is never dialled.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from multidict import CIMultiDict

from . import tracing
from .balancer import Balancer, Outcome
from .deadline import Deadline
from .deadline import from_headers as deadline_from
from .discovery import Discovery
from .errors import (
    BadRequest,
    MisdirectedRequest,
    SidecarError,
    UnknownService,
    UpstreamTimeout,
    error_response,
)
from .forward import REQUEST_ID, Forwarder, ForwardError, request_headers
from .messages import Request, Response
from .observe import Observer
from .registry.base import Instance
from .retry import FailureKind, ReplayBuffer, RetryBudget, backoff_delay, response_failure, retry_eligible
from .tunnel import is_upgrade, tunnel

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
    ) -> None:
        self.connect_timeout = connect_timeout
        self.tunnel_idle_timeout = tunnel_idle_timeout
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

    async def handle(self, request: Request) -> Response:
        self.requests += 1
        started = time.monotonic()
        trace = tracing.from_headers(request.headers)
        deadline = deadline_from(request.headers, self.policy.request_timeout, started)
        service = "-"
        call = _Call()
        with self._in_flight:
            try:
                service, path = parse_target(request.raw_path, request.headers.get("Host"))
                response = await self._call(request, service, path, deadline, trace, call)
            except SidecarError as err:
                if isinstance(err, (UnknownService, BadRequest, MisdirectedRequest)):
                    service = "-"  # a name nobody registered never becomes a metric label
                response = error_response(err, self.name, request.headers.get(REQUEST_ID))
        self.observer.finished(
            "outbound",
            request,
            response.status,
            started,
            trace,
            service=service,
            instance=call.instance,
            request_id=call.request_id or request.headers.get(REQUEST_ID),
            attempts=call.attempts,
        )
        return response

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
        body = ReplayBuffer(aiter(limited)) if limited is not None else None
        tried: set[str] = set()
        policy = self.policy
        while True:
            call.attempts += 1
            now = time.monotonic()
            if deadline.expired(now):
                raise UpstreamTimeout(f"the deadline for calling {service!r} passed")
            lease = self.balancer.acquire(service, instances, exclude=tried)
            tried.add(lease.instance.id)
            call.instance = lease.instance.id
            headers.update(deadline.outgoing_headers(now))
            timeout = deadline.try_timeout(policy.per_try_timeout, now)
            try:
                upstream = await self.forwarder.open(
                    request.method,
                    lease.instance.endpoint,
                    path,
                    headers,
                    body.body() if body else None,
                    timeout,
                )
            except ForwardError as err:
                broken = limited.broken() if limited is not None else None
                if broken is not None:
                    self.balancer.release(lease, "cancelled")  # the caller broke a limit
                    raise broken from err
                self.balancer.release(lease, _outcome(err))
                if err.kind != "refused" and self._may_retry(
                    request, service, budget, deadline, call.attempts, _failure_kind(err), None, body
                ):
                    await asyncio.sleep(backoff_delay(call.attempts))
                    continue
                raise err.error from err
            failure = response_failure(upstream.status, upstream.headers)
            if failure is not None and self._may_retry(
                request, service, budget, deadline, call.attempts, failure, upstream.status, body
            ):
                upstream.release()
                self.balancer.release(lease, upstream.status)
                await asyncio.sleep(backoff_delay(call.attempts))
                continue
            outcome: Outcome = "cancelled"
            try:
                response = await self.forwarder.relay(request, upstream, call.request_id, limited)
                outcome = upstream.status
                return response
            finally:
                self.balancer.release(lease, outcome)

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
        lease = self.balancer.acquire(service, instances)
        call.instance, call.attempts = lease.instance.id, 1
        now = time.monotonic()
        headers.update(deadline.outgoing_headers(now))
        outcome: Outcome = "cancelled"
        try:
            response = await tunnel(
                request,
                lease.instance.endpoint,
                path,
                headers,
                call.request_id or "",
                connect_timeout=self.connect_timeout,
                response_timeout=deadline.try_timeout(self.policy.per_try_timeout, now),
                idle_timeout=self.tunnel_idle_timeout,
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

    def _may_retry(
        self,
        request: Request,
        service: str,
        budget: RetryBudget,
        deadline: Deadline,
        attempts: int,
        kind: FailureKind,
        status: int | None,
        body: ReplayBuffer | None,
    ) -> bool:
        if attempts > self.policy.retries or deadline.expired(time.monotonic()):
            return False
        replayable = body is None or body.replayable
        if not retry_eligible(request.method, request.headers, kind, status, replayable):
            return False
        if not budget.can_retry():
            self.metrics.inc_budget_exhausted(service)
            return False
        budget.record_retry()
        self.metrics.inc_retry(service)
        return True


class _Call:
    """What one outbound call did, for the access log."""

    __slots__ = ("attempts", "instance", "request_id")

    def __init__(self) -> None:
        self.attempts = 0
        self.instance: str | None = None
        self.request_id: str | None = None


def _failure_kind(err: ForwardError) -> FailureKind:
    return (
        "timeout"
        if err.kind == "timeout"
        else "connect_failure"
        if err.kind == "connect_failure"
        else "reset"
    )


def _outcome(err: ForwardError) -> Outcome:
    if err.kind == "refused":
        return "cancelled"
    return _failure_kind(err)
