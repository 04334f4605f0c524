"""TLS contexts made from an Identity, swapped whole on every rotation, and the checks a
sidecar makes of its peer's certificate.

Rules of this file:
- mesh contexts trust only the identity's roots (never the system's public CAs:
  `ssl.create_default_context()` loads them all and costs 17-32 ms), require TLS 1.2 or
  later and a certificate from the other side too;
- a rotation builds new contexts and swaps them in with one assignment: handshakes after
  it use the new certificate, connections made before it go on until they close (the
  client pools replace theirs, see `generation`);
- `check_hostname` is off: a peer is named by its SPIFFE URI SAN, not a DNS name, and the
  caller checks that URI itself (`ClientTLS.check_peer`) after the handshake and before
  the first byte of the request;
- the private key goes to OpenSSL through a file only this user can read, deleted at once.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from dataclasses import dataclass

from ..http.tls import PeerCertificate, PeerRejected
from .base import Identity, SpiffeId


def _load_identity(ctx: ssl.SSLContext, identity: Identity) -> None:
    ctx.load_verify_locations(cadata=identity.roots_pem.decode("ascii"))
    fd, path = tempfile.mkstemp(prefix="micro-sidecar-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(identity.chain_pem.rstrip(b"\n") + b"\n" + identity.key_pem)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def server_context(identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_identity(ctx, identity)
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # a peer's HTTP/2 pool asks for h2
    return ctx


def client_context(identity: Identity, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_identity(ctx, identity)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def peer_identity(peer: PeerCertificate | None) -> SpiffeId | None:
    """The peer's service identity: its single SPIFFE URI SAN, else None."""
    if peer is None or len(peer.uris) != 1:
        return None
    try:
        return SpiffeId.parse(peer.uris[0])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Contexts:
    identity: Identity
    server: ssl.SSLContext
    client: ssl.SSLContext
    client_h2: ssl.SSLContext
    generation: int


class MeshTLS:
    """The current identity and its contexts; `update` swaps them."""

    def __init__(self, identity: Identity) -> None:
        self._now = self._build(identity, 1)

    @staticmethod
    def _build(identity: Identity, generation: int) -> _Contexts:
        return _Contexts(
            identity,
            server_context(identity),
            client_context(identity),
            client_context(identity, ("h2",)),
            generation,
        )

    def update(self, identity: Identity) -> None:
        """Use `identity` for every handshake from now on."""
        self._now = self._build(identity, self._now.generation + 1)

    @property
    def identity(self) -> Identity:
        return self._now.identity

    @property
    def generation(self) -> int:
        return self._now.generation

    def server_context(self) -> ssl.SSLContext:
        return self._now.server

    def client_context(self) -> ssl.SSLContext:
        return self._now.client

    def client_h2_context(self) -> ssl.SSLContext:
        return self._now.client_h2

    def client(self, service: str) -> ClientTLS:
        """How to dial an instance of `service`: our certificate, and a check that the
        peer's is `service`'s in our trust domain."""
        return ClientTLS(self, service)


class ClientTLS:
    """The TLS side of one upstream pool (see sidecar.http.client.Pool)."""

    __slots__ = ("_mesh", "service")

    def __init__(self, mesh: MeshTLS, service: str) -> None:
        self._mesh = mesh
        self.service = service

    @property
    def generation(self) -> int:
        return self._mesh.generation

    def context(self) -> ssl.SSLContext:
        return self._mesh.client_context()

    def h2_context(self) -> ssl.SSLContext:
        return self._mesh.client_h2_context()

    def check_peer(self, cert: PeerCertificate | None) -> None:
        peer = peer_identity(cert)
        ours = self._mesh.identity.spiffe_id
        if peer is None:
            shown = ", ".join(u[:100] for u in cert.uris) if cert else ""
            shown = shown or "none"
            raise PeerRejected(f"the peer's certificate has no single service SPIFFE ID (URI SANs: {shown})")
        if peer.service != self.service or peer.trust_domain != ours.trust_domain:
            raise PeerRejected(
                f"the peer presented {peer.uri}, not service {self.service!r} of {ours.trust_domain}"
            )
