"""The files identity source: PEM files that another program writes and rotates."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.identity import certs
from sidecar.identity.base import IdentityUnavailable, SpiffeId
from sidecar.identity.files import FilesIdentitySource

WEB = SpiffeId("example.org", "web")
POLL = 0.05


class Writer:
    """What spiffe-helper does: one CA, leaves for WEB, written to three files."""

    def __init__(self, tmp: Path) -> None:
        self.cert, self.key, self.ca = tmp / "svid.pem", tmp / "svid_key.pem", tmp / "bundle.pem"
        self.ca_cert, self.ca_key = certs.make_ca("example.org")
        self.ca.write_bytes(certs.cert_to_pem(self.ca_cert))

    def leaf(self, ca_cert=None, ca_key=None) -> tuple[bytes, bytes]:
        leaf, key = certs.make_leaf(ca_cert or self.ca_cert, ca_key or self.ca_key, WEB, ttl=3600)
        return certs.cert_to_pem(leaf), certs.key_to_pem(key)

    def write(self, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> None:
        if cert_pem is not None:
            _replace(self.cert, cert_pem)
        if key_pem is not None:
            _replace(self.key, key_pem)

    def source(self) -> FilesIdentitySource:
        return FilesIdentitySource(self.cert, self.key, self.ca, poll=POLL)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def assert_no_key(text: str, *key_pems: bytes) -> None:
    assert "PRIVATE KEY" not in text
    for pem in key_pems:
        for line in pem.decode().splitlines():
            if line and not line.startswith("-----"):
                assert line not in text


@pytest.fixture
def writer(tmp_path):
    w = Writer(tmp_path)
    w.write(*w.leaf())
    return w


async def test_reads_the_identity_in_the_files(writer):
    source = writer.source()
    identity = await source.fetch(None)
    assert identity.spiffe_id == WEB and identity.source == "files"
    assert identity.chain_pem == writer.cert.read_bytes()
    assert identity.roots_pem == writer.ca.read_bytes()
    assert source.describe() == {
        "kind": "files",
        "cert": str(writer.cert),
        "key": str(writer.key),
        "ca": str(writer.ca),
    }
    assert_no_key(repr(source) + str(source.describe()) + repr(identity), writer.key.read_bytes())


async def test_a_rotation_is_picked_up_and_a_half_written_one_waited_out(writer):
    source = writer.source()
    current = await source.fetch(None)
    rotation = asyncio.create_task(source.fetch(current))

    os.utime(writer.cert)  # touched, same content: not a rotation
    await asyncio.sleep(4 * POLL)
    assert not rotation.done()

    cert_pem, key_pem = writer.leaf()
    writer.write(cert_pem=cert_pem)  # the new certificate, the old key still there
    await asyncio.sleep(4 * POLL)
    assert not rotation.done()
    assert source.waiting is not None and "does not belong to certificate" in source.waiting
    assert "waiting=" in repr(source) and "waiting" in source.describe()
    assert_no_key(source.waiting + repr(source), key_pem, current.key_pem)

    writer.write(key_pem=key_pem)
    rotated = await asyncio.wait_for(rotation, 2)
    assert rotated.chain_pem == cert_pem and rotated.key_pem == key_pem
    assert rotated.serial != current.serial
    assert source.waiting is None and "waiting" not in source.describe()


async def test_a_leaf_of_a_new_root_waits_for_the_bundle_that_trusts_it(writer):
    source = writer.source()
    current = await source.fetch(None)
    rotation = asyncio.create_task(source.fetch(current))

    new_ca, new_ca_key = certs.make_ca("example.org")
    writer.write(*writer.leaf(new_ca, new_ca_key))  # before the bundle
    await asyncio.sleep(4 * POLL)
    assert not rotation.done()
    assert source.waiting is not None and "not signed by any of the 1 roots" in source.waiting

    _replace(writer.ca, certs.cert_to_pem(writer.ca_cert) + certs.cert_to_pem(new_ca))
    rotated = await asyncio.wait_for(rotation, 2)
    assert len(certs.load_certs(rotated.roots_pem)) == 2
    x509.load_pem_x509_certificate(rotated.chain_pem).verify_directly_issued_by(new_ca)


async def test_a_file_missing_for_a_moment_is_waited_out(writer):
    source = writer.source()
    current = await source.fetch(None)
    rotation = asyncio.create_task(source.fetch(current))
    cert_pem, key_pem = writer.leaf()
    writer.key.unlink()
    await asyncio.sleep(4 * POLL)
    assert not rotation.done() and source.waiting is not None and str(writer.key) in source.waiting
    writer.write(cert_pem, key_pem)
    assert (await asyncio.wait_for(rotation, 2)).chain_pem == cert_pem
    rotation = asyncio.create_task(source.fetch(current))
    await asyncio.sleep(2 * POLL)
    rotation.cancel()  # cancelling a waiting fetch is safe
    with pytest.raises(asyncio.CancelledError):
        await rotation


async def test_files_that_make_no_identity_are_named(writer, tmp_path):
    key_pem = writer.key.read_bytes()
    other_key = certs.key_to_pem(certs.new_key())
    messages = []

    async def fails(match: str) -> None:
        with pytest.raises(IdentityUnavailable, match=match) as caught:
            await writer.source().fetch(None)
        messages.append(str(caught.value))

    writer.write(key_pem=other_key)
    await fails(rf"TLS key {writer.key} does not belong to certificate {writer.cert}")
    writer.write(key_pem=key_pem[:100])
    await fails(rf"TLS key {writer.key}: not an unencrypted PEM private key")
    encrypted = certs.load_key(key_pem).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    writer.write(key_pem=encrypted)
    await fails(rf"TLS key {writer.key}: the private key is encrypted")
    writer.write(key_pem=key_pem)

    cert_pem = writer.cert.read_bytes()
    writer.write(cert_pem=certs.cert_to_pem(writer.ca_cert))  # a certificate with no service ID
    await fails(rf"TLS certificate {writer.cert}: not a service SPIFFE ID")
    writer.write(cert_pem=b"garbage")
    await fails(rf"TLS certificate {writer.cert}: no PEM certificate found")
    writer.write(cert_pem=cert_pem)

    _replace(writer.ca, b"")
    await fails(rf"TLS CA {writer.ca}: no PEM root certificate found")
    stranger, _ = certs.make_ca("example.org")
    _replace(writer.ca, certs.cert_to_pem(stranger))
    await fails(rf"TLS certificate {writer.cert} against CA {writer.ca}: the chain is not signed")
    writer.ca.unlink()
    await fails(rf"TLS CA {writer.ca}: No such file or directory")

    for message in messages:
        assert_no_key(message, key_pem, other_key, encrypted)


def test_poll_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="poll"):
        FilesIdentitySource(tmp_path / "c", tmp_path / "k", tmp_path / "ca", poll=0)
