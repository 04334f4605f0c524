"""Certificates for the TLS rows, and the new-connection measurement (openssl s_time).

Every certificate here comes from sidecar.identity.certs, as the sidecars' own do: one
P-256 leaf whose identity is a SPIFFE URI SAN, signed by a CA whose files are PEM pairs
(`<name>.pem`, `<name>.key`, the key 0600). The nginx rows get a CA of their own
(`make_ca`); the sidecars make theirs beside their registry file (`mesh-ca.pem`), and a
client of the handshake measurement gets its leaf from whichever CA the server trusts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from sidecar.identity.base import SpiffeId
from sidecar.identity.certs import (
    ISSUER_KEY_TYPES,
    cert_to_pem,
    key_to_pem,
    load_certs,
    load_key,
    make_ca,
    make_leaf,
)

LEAF_TTL = 86400.0  # longer than any run: no certificate expires during one


def write_pair(stem: Path, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    """`<stem>.pem` and `<stem>.key` (0600)."""
    cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_path.write_bytes(cert_to_pem(cert))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_to_pem(key))
    return cert_path, key_path


def make_bench_ca(directory: Path, trust_domain: str) -> Path:
    """A new CA in `directory` (ca.pem, ca.key); the path of its certificate."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = make_ca(trust_domain)
    return write_pair(directory / "ca", cert, key)[0]


def mint_leaf(ca_cert: Path, service: str, stem: Path, dns_name: str | None = None) -> tuple[Path, Path]:
    """A leaf for `service` in the CA's trust domain, signed by the CA at `ca_cert` (its key
    beside it, `.key`), written to `<stem>.pem` and `<stem>.key`.

    `dns_name` adds a DNS SAN: nginx's `proxy_ssl_verify` checks the upstream's certificate
    against a host name and knows nothing of SPIFFE URIs, which is what the sidecar pins."""
    ca = load_certs(ca_cert.read_bytes(), "CA certificate")[0]
    ca_key = load_key(ca_cert.with_suffix(".key").read_bytes())
    if not isinstance(ca_key, ISSUER_KEY_TYPES):
        raise ValueError(f"{ca_cert.with_suffix('.key')}: this kind of key cannot sign")
    cert, key = make_leaf(ca, ca_key, SpiffeId(trust_domain_of(ca), service), ttl=LEAF_TTL)
    if dns_name:
        cert = _with_dns_name(cert, ca_key, dns_name)
    return write_pair(stem, cert, key)


def trust_domain_of(ca: x509.Certificate) -> str:
    """The trust domain in a mesh CA's URI SAN (`spiffe://<trust domain>`)."""
    san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").strip("/")
    raise ValueError("the CA certificate has no spiffe:// URI SAN")


def _with_dns_name(
    cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes, dns: str
) -> x509.Certificate:
    """`cert` as make_leaf made it, the DNS name added to its SAN, signed again by the CA."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName([*value, x509.DNSName(dns)])
        builder = builder.add_extension(value, critical=ext.critical)
    return builder.sign(ca_key, hashes.SHA256())
