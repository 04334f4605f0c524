"""The header rules that every hop shares, whichever direction and protocol it is:
what never crosses a proxy (hop-by-hop headers and the ones Connection names, RFC 9110
section 7.6.1), the request id that travels with a request, the forwarding headers a hop
sets (X-Forwarded-*), the names only sidecars may send (X-Sidecar-*), and the one
transfer coding a proxy can re-frame (a single final `chunked`, RFC 9112 section 6.3).
"""

from __future__ import annotations

import itertools
import os
import re

from multidict import CIMultiDict, CIMultiDictProxy

from .messages import Headers, Request, http_date

# A Host header (or :authority): a host name, IPv4 or bracketed IPv6 address, and a port.
HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]{1,5})?$")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
REQUEST_ID = "X-Request-Id"
# Header names the sidecar uses between its own hops; a caller may not set them.
INTERNAL_PREFIX = "x-sidecar-"


def only_chunked(codings: list[str]) -> bool:
    """Whether Transfer-Encoding values are exactly one final `chunked`, the only coding a
    proxy can frame (RFC 9112 section 6.3)."""
    return [t.strip().lower() for value in codings for t in value.split(",")] == ["chunked"]


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | connection_listed(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lowered = key.lower()
        if lowered in drop:
            continue
        out.add(key, value)
    return out


# Request ids: a random per-process prefix and a counter, 32 hex characters. Unique per
# process run (the prefix has 64 random bits) and far cheaper than uuid4 per request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


# Lower-cased names dropped from every forwarded request: hop-by-hop, Expect (answered by
# the sidecar itself, see Forwarder.body), forwarding facts that cannot be verified, and
# the ones set below.
_DROP_REQUEST = HOP_BY_HOP | {
    "expect",
    "forwarded",
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
}


def request_headers(request: Request, host: str | None) -> tuple[CIMultiDict[str], str]:
    """Headers to send upstream, and the request id they carry."""
    incoming = request.headers
    drop = _DROP_REQUEST
    if "Connection" in incoming:
        drop = drop | connection_listed(incoming)
    if not request.body_exists:
        drop = drop | {"content-length"}
    headers: CIMultiDict[str] = CIMultiDict()
    add = headers.add
    for key, value in incoming.items():
        lowered = key.lower()
        if lowered in drop:
            continue
        if lowered == "host" and host is not None:
            if "Host" not in headers:
                add(key, host)
            continue
        # Rack and Puma read '_' and '-' alike: a header with '_' could spoof a trusted one.
        # Forwarding facts other than the ones we set below cannot be verified: drop them.
        if "_" in key or (lowered.startswith("x-") and lowered.startswith((INTERNAL_PREFIX, "x-forwarded-"))):
            continue
        add(key, value)
    peer = request.remote or ""
    prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
    add("X-Forwarded-For", f"{prior}, {peer}" if prior else peer)
    add("X-Forwarded-Proto", request.scheme)
    original_host = incoming.get("Host")
    if original_host:
        add("X-Forwarded-Host", original_host)
    request_id = incoming.get(REQUEST_ID) or new_request_id()
    add(REQUEST_ID, request_id)
    if host is not None and "Host" not in headers:
        add("Host", host)
    return headers, request_id


# Lower-cased names not copied from an upstream response: hop-by-hop, and the ones the
# relay sets itself (the body's framing, one X-Request-Id).
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "x-request-id"}


def response_headers(upstream: CIMultiDictProxy[str], request_id: str, from_app: bool = False) -> Headers:
    """Headers to relay to the client (their framing is added by Request.start).

    `from_app`: the answer comes from our own app (the inbound hop), whose `X-Sidecar-*`
    headers are dropped: an app that relays its own sidecar's error must not make the
    caller's sidecar believe that this hop's sidecar answered (and, say, that a POST
    never reached an app, when this app ran it).
    """
    drop = _DROP_RESPONSE
    if "Connection" in upstream:
        drop = drop | connection_listed(upstream)
    if from_app:
        headers = [
            (key, value)
            for key, value in upstream.items()
            if (lowered := key.lower()) not in drop and not lowered.startswith(INTERNAL_PREFIX)
        ]
    else:
        headers = [(key, value) for key, value in upstream.items() if key.lower() not in drop]
    headers.append((REQUEST_ID, upstream.get(REQUEST_ID, request_id)))
    if "Date" not in upstream:  # RFC 9110 section 6.6.1: a recipient with a clock adds it
        headers.append(("Date", http_date()))
    return headers
