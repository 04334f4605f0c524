"""The outbound listener: app -> sidecar -> a healthy instance of a service, by name.

Three ways to name the service (see the README): a path prefix (`/orders/v1/items`), the
Host header (`Host: orders`) or an HTTP proxy absolute-form target
(`GET http://orders/v1/items`). A name is only ever looked up in the registry: an
address taken from the request is never dialled.
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web

from .balancer import RoundRobin
from .discovery import Discovery
from .errors import BadRequest, MisdirectedRequest, SidecarError, error_response
from .forward import REQUEST_ID, Forwarder

_SERVICE_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _is_service_name(host: str) -> bool:
    if not host or host == "localhost" or not _SERVICE_RE.match(host):
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


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


class Outbound:
    def __init__(self, name: str, discovery: Discovery, forwarder: Forwarder) -> None:
        self.name = name
        self.discovery = discovery
        self.forwarder = forwarder
        self.balancer = RoundRobin()
        self.requests = 0

    def __repr__(self) -> str:
        return f"<Outbound requests={self.requests} active={self.forwarder.active}>"

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        try:
            service, path = parse_target(request.raw_path, request.headers.get("Host"))
            instances = await self.discovery.resolve(service)
            instance = self.balancer.pick(service, instances)
            return await self.forwarder.forward(request, instance.endpoint, path, host=service)
        except SidecarError as err:
            return error_response(err, self.name, request.headers.get(REQUEST_ID))
