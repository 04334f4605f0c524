"""Certificates as pure functions: make a mesh CA and leaves, read the facts off a chain.

Rules of this file: no files, no clocks except a `now` the caller may pass, no logging.
Errors are ValueError with a message that says what is wrong with which input and never
quotes key material (messages from `cryptography` about keys are replaced, not wrapped).
Sources turn these ValueErrors into IdentityUnavailable with the path or URL they read.

Leaves made here have an empty subject and one critical URI SAN, the SPIFFE ID: a common
name would be a second identity (hostname checks fall back to the CN when a certificate
has no DNS SAN), and RFC 5280 wants the SAN critical when the subject is empty.
"""

from __future__ import annotations

import datetime
import itertools
import math
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .base import Identity, SpiffeId

CA_TTL = 10 * 365 * 86400.0
BACKDATE = 60.0  # seconds of NotBefore in the past, for peers whose clocks are behind
# the CA keys `make_leaf` can sign with (an operator's CA need not be P-256)
ISSUER_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKeyTypes) -> bytes:
    """PKCS8, unencrypted: what `ssl.SSLContext.load_cert_chain` reads without a password."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(key_pem: bytes) -> PrivateKeyTypes:
    """The private key in `key_pem` (unencrypted PEM); ValueError without the key's bytes."""
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # a password-protected key
        raise ValueError("the private key is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not an unencrypted PEM private key this sidecar can read") from None


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certs(pem: bytes, what: str = "certificate") -> list[x509.Certificate]:
    """Every CERTIFICATE block in `pem`, in order (other blocks, a key included, are
    skipped); ValueError when there is none or one does not parse."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"no PEM {what} found")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError(f"a PEM {what} does not parse") from None
    if not certs:
        raise ValueError(f"no PEM {what} found")
    return certs


def certs_to_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(cert_to_pem(c) for c in certs)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The certificate's single SPIFFE URI SAN; ValueError when there is none, several,
    or it is not a service SPIFFE ID."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no subjectAltName, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise ValueError("the certificate has no URI SAN, so no SPIFFE ID")
    if len(uris) > 1:
        raise ValueError(f"the certificate has {len(uris)} URI SANs; a SPIFFE identity has exactly one")
    return SpiffeId.parse(uris[0])


def leaf_facts(chain_pem: bytes) -> tuple[SpiffeId, float, float, str]:
    """(SPIFFE ID, NotBefore, NotAfter, serial) of the first certificate in `chain_pem`.

    Times are seconds since the epoch; the serial is lower-case hex without separators.
    """
    leaf = load_certs(chain_pem, "certificate")[0]
    return (
        spiffe_id_of(leaf),
        leaf.not_valid_before_utc.timestamp(),
        leaf.not_valid_after_utc.timestamp(),
        format(leaf.serial_number, "x"),
    )


def key_matches(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether `key` is the private key of `cert`."""
    return _public_der(key.public_key()) == _public_der(cert.public_key())


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def identity_from_pem(chain_pem: bytes, key_pem: bytes, roots_pem: bytes, source: str) -> Identity:
    """An Identity from PEM, checked: the chain's first certificate has one SPIFFE URI SAN,
    `key_pem` is the private key of that certificate, `roots_pem` holds at least one
    certificate. ValueError otherwise.

    The PEM is stored re-encoded: certificates only in `chain_pem` and `roots_pem` (a key
    block that came along in a combined file is dropped), the key as unencrypted PKCS8.
    Whether the chain is signed by one of the roots is `check_chain`'s question.
    """
    chain = load_certs(chain_pem, "certificate")
    spiffe_id, not_before, not_after, serial = leaf_facts(cert_to_pem(chain[0]))
    key = load_key(key_pem)
    if not key_matches(key, chain[0]):
        raise ValueError(
            f"the private key does not belong to the certificate for {spiffe_id} (serial {serial})"
        )
    roots = load_certs(roots_pem, "root certificate")
    return Identity(
        spiffe_id=spiffe_id,
        chain_pem=certs_to_pem(chain),
        key_pem=key_to_pem(key),
        roots_pem=certs_to_pem(roots),
        not_before=not_before,
        not_after=not_after,
        serial=serial,
        source=source,
    )


def check_chain(chain_pem: bytes, roots_pem: bytes) -> None:
    """ValueError unless each certificate of the chain is signed by the next one and the
    last is signed by (or is) one of the roots. Signatures and names only: validity
    periods and extensions are the TLS handshake's business."""
    chain = load_certs(chain_pem, "certificate")
    roots = load_certs(roots_pem, "root certificate")
    for i, (child, parent) in enumerate(itertools.pairwise(chain)):
        if not _issued_by(child, parent):
            raise ValueError(f"certificate {i} of the chain is not signed by certificate {i + 1}")
    top = chain[-1]
    if top in roots or any(_issued_by(top, root) for root in roots):
        return
    issuer = top.issuer.rfc4514_string() or "an empty name"
    raise ValueError(f"the chain is not signed by any of the {len(roots)} roots (its issuer is {issuer})")


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC)


def make_ca(
    trust_domain: str,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    ttl: float = CA_TTL,
    now: float | None = None,
    path_length: int | None = 0,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed mesh CA for `trust_domain` and its key (a new P-256 key unless given).

    CA:TRUE with `path_length` (0: it signs leaves only), keyCertSign and cRLSign, the
    trust domain's SPIFFE ID `spiffe://<trust domain>` as URI SAN, NotBefore backdated.
    """
    now = time.time() if now is None else now
    key = new_key() if key is None else key
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "micro-sidecar"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"micro-sidecar mesh CA {trust_domain}"[:64]),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - BACKDATE))
        .not_valid_after(_utc(now + ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    spiffe_id: SpiffeId,
    *,
    ttl: float,
    now: float | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf for `spiffe_id` signed by the CA, and its key (a new P-256 key unless given).

    Valid from `now - BACKDATE` to `now + ttl`, never past the CA's own NotAfter. The
    SPIFFE ID is the only SAN (critical); serverAuth and clientAuth, CA:FALSE.
    """
    now = time.time() if now is None else now
    key = new_key() if key is None else key
    # X.509 times have whole seconds and the builder drops the fraction: round NotAfter up,
    # or a leaf asked for 2 s could be valid for 1 s and expire before its renewal time.
    not_after = min(_utc(math.ceil(now + ttl)), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - BACKDATE))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key
