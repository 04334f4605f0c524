"""What the wing knows of TLS: the peer certificate of a connection, read once.

Which contexts to use and what a certificate must say are the identity layer's business
(sidecar/identity/tls.py); the wing only carries TLS and reports what the peer showed.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Protocol

# The first byte of a TLS record carrying a handshake message (a ClientHello).
TLS_HANDSHAKE = 0x16


class PeerRejected(ConnectionError):
    """The peer's certificate does not name the one we meant to reach (nothing was sent)."""


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The verified certificate the peer presented: its URI SANs and its SHA-256."""

    uris: tuple[str, ...]
    sha256: str


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    der = ssl_object.getpeercert(binary_form=True)
    if not cert or not der:
        return None
    sans: tuple[tuple[str, str], ...] = cert.get("subjectAltName", ())  # type: ignore[assignment]
    uris = tuple(str(value) for kind, value in sans if kind == "URI")
    return PeerCertificate(uris, hashlib.sha256(der).hexdigest())


class ServerTLS(Protocol):
    """The server side: the context for the next handshake (it changes on rotation)."""

    def server_context(self) -> ssl.SSLContext | None: ...


class ClientTLS(Protocol):
    """The client side of one pool: the context for the next handshake, a number that
    changes with it (pooled connections of an older one are not reused), and the check of
    the peer's certificate before the first request is written. `service` is the name the
    peer must present (one pool per endpoint and service)."""

    service: str

    @property
    def generation(self) -> int: ...

    def context(self) -> ssl.SSLContext: ...

    def h2_context(self) -> ssl.SSLContext: ...

    def check_peer(self, peer: PeerCertificate | None) -> None: ...
