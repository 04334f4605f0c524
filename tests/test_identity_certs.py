"""sidecar/identity/certs.py as pure functions: parse what it made, and what it must refuse."""

from __future__ import annotations

import datetime
import math
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity import certs
from sidecar.identity.base import SpiffeId

WEB = SpiffeId("micro-sidecar.local", "web")


def key_lines(key_pem: bytes) -> list[str]:
    """The base64 lines of a PEM key: none may appear in a message."""
    return [line for line in key_pem.decode().splitlines() if line and not line.startswith("-----")]


def assert_no_key(text: str, *key_pems: bytes) -> None:
    assert "PRIVATE KEY" not in text
    for key_pem in key_pems:
        for line in key_lines(key_pem):
            assert line not in text


def custom_cert(ca_cert, ca_key, san: x509.SubjectAlternativeName | None, *, ca: bool = False, key=None):
    key = key or certs.new_key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custom")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def ca():
    return certs.make_ca("micro-sidecar.local")


def test_leaf_has_one_critical_uri_san_and_the_mesh_usages(ca):
    ca_cert, ca_key = ca
    now = time.time()
    leaf, key = certs.make_leaf(ca_cert, ca_key, WEB, ttl=300, now=now)
    assert leaf.subject == x509.Name([])  # no CN: it would be a second identity
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(WEB.uri)]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_agreement
    assert not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.not_valid_before_utc.timestamp() == math.floor(now - 60)
    # whole seconds, rounded up: never shorter than asked
    assert now + 300 <= leaf.not_valid_after_utc.timestamp() < now + 301
    assert key.curve.name == "secp256r1"
    leaf.verify_directly_issued_by(ca_cert)


def test_ca_is_a_ca_for_leaves_only(ca):
    ca_cert, _ = ca
    bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://micro-sidecar.local"]
    years = (ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1


def test_leaf_never_outlives_its_ca():
    short_ca, short_key = certs.make_ca("micro-sidecar.local", ttl=100)
    leaf, _ = certs.make_leaf(short_ca, short_key, WEB, ttl=86400)
    assert leaf.not_valid_after_utc == short_ca.not_valid_after_utc


def test_openssl_accepts_the_leaf_strictly_for_both_purposes(ca, tmp_path):
    ca_cert, ca_key = ca
    leaf, _ = certs.make_leaf(ca_cert, ca_key, WEB, ttl=300)
    (tmp_path / "ca.pem").write_bytes(certs.cert_to_pem(ca_cert))
    (tmp_path / "leaf.pem").write_bytes(certs.cert_to_pem(leaf))
    for purpose in ("sslserver", "sslclient"):
        out = subprocess.run(
            ["openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile", "ca.pem", "leaf.pem"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0 and "leaf.pem: OK" in out.stdout, out.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", "leaf.pem", "-noout", "-ext", "subjectAltName"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "critical" in text
    assert [line.strip() for line in text.splitlines()[1:] if line.strip()] == [f"URI:{WEB.uri}"]


def test_leaf_facts(ca):
    ca_cert, ca_key = ca
    leaf, _ = certs.make_leaf(ca_cert, ca_key, WEB, ttl=300)
    spiffe_id, not_before, not_after, serial = certs.leaf_facts(
        certs.cert_to_pem(leaf) + certs.cert_to_pem(ca_cert)
    )
    assert spiffe_id == WEB
    assert not_before == leaf.not_valid_before_utc.timestamp()
    assert not_after == leaf.not_valid_after_utc.timestamp()
    assert serial == format(leaf.serial_number, "x") and serial == serial.lower()


@pytest.mark.parametrize(
    ("san", "message"),
    [
        (None, "no subjectAltName"),
        (x509.SubjectAlternativeName([x509.DNSName("web.local")]), "no URI SAN"),
        (
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(WEB.uri), x509.UniformResourceIdentifier(WEB.uri + "x")]
            ),
            "2 URI SANs",
        ),
        (
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("https://web.local/")]),
            "not a SPIFFE ID",
        ),
        (
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://micro-sidecar.local")]),
            "not a service SPIFFE ID",
        ),
    ],
)
def test_leaf_facts_refuses_anything_but_one_service_spiffe_id(ca, san, message):
    cert, _ = custom_cert(*ca, san)
    with pytest.raises(ValueError, match=message):
        certs.leaf_facts(certs.cert_to_pem(cert))


def test_leaf_facts_refuses_what_is_not_a_certificate():
    with pytest.raises(ValueError, match="no PEM certificate"):
        certs.leaf_facts(b"")
    with pytest.raises(ValueError, match="does not parse"):
        certs.leaf_facts(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_identity_from_pem_checks_the_key_and_keeps_certificates_only(ca):
    ca_cert, ca_key = ca
    leaf, key = certs.make_leaf(ca_cert, ca_key, WEB, ttl=300)
    key_pem = certs.key_to_pem(key)
    # a combined file (key and certificate in one), as some tools write
    identity = certs.identity_from_pem(
        key_pem + certs.cert_to_pem(leaf), key_pem, certs.cert_to_pem(ca_cert), "test"
    )
    assert identity.spiffe_id == WEB and identity.source == "test"
    assert identity.chain_pem == certs.cert_to_pem(leaf)
    assert identity.key_pem == key_pem and identity.roots_pem == certs.cert_to_pem(ca_cert)
    assert identity.valid()
    assert_no_key(repr(identity) + str(identity.describe()), key_pem)

    other = certs.key_to_pem(certs.new_key())
    with pytest.raises(ValueError, match="does not belong") as wrong:
        certs.identity_from_pem(certs.cert_to_pem(leaf), other, certs.cert_to_pem(ca_cert), "test")
    assert_no_key(str(wrong.value), other, key_pem)
    with pytest.raises(ValueError, match="no PEM root certificate"):
        certs.identity_from_pem(certs.cert_to_pem(leaf), key_pem, b"", "test")


def test_unreadable_keys_are_refused_without_quoting_them():
    key_pem = certs.key_to_pem(certs.new_key())
    broken = key_pem.replace(key_pem.splitlines()[2], b"A" * 64)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key") as bad:
        certs.load_key(broken)
    assert_no_key(str(bad.value), key_pem, broken)
    encrypted = certs.new_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ValueError, match="encrypted") as enc:
        certs.load_key(encrypted)
    assert_no_key(str(enc.value), encrypted)


def test_check_chain_follows_intermediates_to_a_root():
    root, root_key = certs.make_ca("micro-sidecar.local", path_length=1)
    inter, inter_key = custom_cert(root, root_key, None, ca=True)
    leaf, _ = certs.make_leaf(inter, inter_key, WEB, ttl=300)
    chain = certs.cert_to_pem(leaf) + certs.cert_to_pem(inter)
    certs.check_chain(chain, certs.cert_to_pem(root))
    certs.check_chain(chain + certs.cert_to_pem(root), certs.cert_to_pem(root))
    other, _ = certs.make_ca("micro-sidecar.local")
    with pytest.raises(ValueError, match="not signed by any of the 1 roots"):
        certs.check_chain(chain, certs.cert_to_pem(other))
    with pytest.raises(ValueError, match="certificate 0 of the chain is not signed by certificate 1"):
        certs.check_chain(certs.cert_to_pem(leaf) + certs.cert_to_pem(other), certs.cert_to_pem(root))
    # a bundle with several roots: any one will do
    certs.check_chain(chain, certs.cert_to_pem(other) + certs.cert_to_pem(root))


@pytest.mark.parametrize(
    ("uri", "service", "layout"),
    [
        ("spiffe://micro-sidecar.local/ns/default/dc/local/svc/web", "web", "svc"),
        ("spiffe://0a1b.consul/ns/default/dc/dc1/svc/orders", "orders", "svc"),
        ("spiffe://cluster.local/ns/shop/sa/orders", "orders", "sa"),  # cert-manager, Istio
    ],
)
def test_spiffe_ids_of_both_layouts_round_trip(uri, service, layout):
    parsed = SpiffeId.parse(uri)
    assert (parsed.service, parsed.layout, parsed.uri) == (service, layout, uri)


@pytest.mark.parametrize(
    "uri",
    ["spiffe://td/ns/default/svc/web", "spiffe://td/ns//sa/web", "spiffe:///ns/a/sa/b", "spiffe://td/workload"],
)
def test_other_spiffe_paths_are_not_services(uri):
    with pytest.raises(ValueError, match="not a service SPIFFE ID"):
        SpiffeId.parse(uri)
