"""The local identity source: a CA shared through a directory, leaves that renew themselves,
real processes racing to make the CA, and a real mutual TLS handshake between two leaves."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.identity import certs
from sidecar.identity.base import Identity, IdentityUnavailable, SpiffeId
from sidecar.identity.local import LocalIdentitySource

REPO = Path(__file__).resolve().parent.parent


def key_lines(*key_pems: bytes) -> list[str]:
    return [
        line
        for pem in key_pems
        for line in pem.decode().splitlines()
        if line and not line.startswith("-----")
    ]


def assert_no_key(text: str, *key_pems: bytes) -> None:
    assert "PRIVATE KEY" not in text
    for line in key_lines(*key_pems):
        assert line not in text


def write(tmp: Path, name: str, identity: Identity) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.write_bytes(identity.chain_pem)
    key.write_bytes(identity.key_pem)
    return cert, key


def openssl_verify(ca: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", str(ca), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )


async def test_first_fetch_makes_the_ca_with_private_modes(tmp_path):
    ca_dir = tmp_path / "state" / "mesh"
    source = LocalIdentitySource(ca_dir, "web", cert_ttl=60)
    identity = await source.fetch(None)

    assert identity.spiffe_id == SpiffeId("micro-sidecar.local", "web")
    assert identity.source == "local" and identity.valid()
    assert 59 <= identity.not_after - time.time() <= 61
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ca_dir / "mesh-ca.key").st_mode) == 0o600
    assert identity.roots_pem == (ca_dir / "mesh-ca.pem").read_bytes()
    assert not [p for p in ca_dir.iterdir() if p.name.endswith(".tmp")]
    leaf, _ = write(tmp_path, "web", identity)
    checked = openssl_verify(ca_dir / "mesh-ca.pem", leaf)
    assert checked.returncode == 0, checked.stderr

    ca_key = (ca_dir / "mesh-ca.key").read_bytes()
    shown = repr(source) + str(source.describe()) + repr(identity) + str(identity.describe())
    assert_no_key(shown, ca_key, identity.key_pem)
    assert source.describe() == {
        "kind": "local",
        "trust_domain": "micro-sidecar.local",
        "ca": str(ca_dir / "mesh-ca.pem"),
        "cert_ttl": 60.0,
    }
    assert "issued=1" in repr(source)

    # a second sidecar of the host reuses the CA, with its own trust domain in its leaf
    orders = await LocalIdentitySource(ca_dir, "orders", trust_domain="example.test").fetch(None)
    assert orders.roots_pem == identity.roots_pem
    assert orders.spiffe_id.uri == "spiffe://example.test/ns/default/dc/local/svc/orders"


def test_sidecars_starting_at_once_share_one_ca(tmp_path):
    ca_dir = tmp_path / "shared"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from sidecar.identity.local import LocalIdentitySource\n"
        "source = LocalIdentitySource(Path(sys.argv[1]), sys.argv[2])\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "identity = asyncio.run(source.fetch(None))\n"
        "sys.stdout.write(identity.chain_pem.decode() + '--roots--\\n' + identity.roots_pem.decode())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ca_dir), f"svc{i}"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(6)
    ]
    try:
        for proc in procs:  # all imported and waiting: then let them go at once
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=20) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ca_pem = (ca_dir / "mesh-ca.pem").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    for i, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, err.decode()
        chain, roots = out.split(b"--roots--\n")
        assert roots == ca_pem
        leaf = x509.load_pem_x509_certificate(chain)
        leaf.verify_directly_issued_by(ca_cert)
        assert certs.spiffe_id_of(leaf).service == f"svc{i}"
        (tmp_path / f"leaf{i}.pem").write_bytes(chain)
        checked = openssl_verify(ca_dir / "mesh-ca.pem", tmp_path / f"leaf{i}.pem")
        assert checked.returncode == 0, checked.stderr
    assert sorted(p.name for p in ca_dir.iterdir()) == ["mesh-ca.key", "mesh-ca.lock", "mesh-ca.pem"]


def _server_context(cert: Path, key: Path, roots: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=roots.decode())
    return ctx


def _client_context(cert: Path, key: Path, roots: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the SPIFFE ID is checked instead, below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=roots.decode())
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[object, object]:
    """(what the server saw of the client, what the client saw of the server): a peer
    certificate dict, or the exception the handshake raised on that side."""
    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen["server"] = tls.getpeercert()
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                seen["server"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client_ctx.wrap_socket(raw) as tls:
                    peer = tls.getpeercert()
                    seen["client"] = peer if tls.recv(2) == b"ok" else ssl.SSLError("no answer")
        except (ssl.SSLError, OSError) as exc:
            seen["client"] = exc
        thread.join(5)
    return seen["server"], seen["client"]


async def test_two_leaves_of_the_local_ca_do_mutual_tls(tmp_path):
    ca_dir = tmp_path / "mesh"
    web = await LocalIdentitySource(ca_dir, "web").fetch(None)
    orders = await LocalIdentitySource(ca_dir, "orders").fetch(None)
    web_files, orders_files = write(tmp_path, "web", web), write(tmp_path, "orders", orders)

    server_saw, client_saw = handshake(
        _server_context(*orders_files, orders.roots_pem), _client_context(*web_files, web.roots_pem)
    )
    assert isinstance(server_saw, dict) and isinstance(client_saw, dict)
    assert server_saw["subjectAltName"] == (("URI", web.spiffe_id.uri),)
    assert client_saw["subjectAltName"] == (("URI", orders.spiffe_id.uri),)
    assert server_saw["subject"] == ()  # no CN that a hostname check could fall back to

    # a leaf of another host's CA is refused by the server, and the client hears of it
    stranger = await LocalIdentitySource(tmp_path / "elsewhere", "web").fetch(None)
    stranger_files = write(tmp_path, "stranger", stranger)
    server_saw, client_saw = handshake(
        _server_context(*orders_files, orders.roots_pem), _client_context(*stranger_files, orders.roots_pem)
    )
    assert isinstance(server_saw, ssl.SSLError) and "certificate verify failed" in str(server_saw)
    assert isinstance(client_saw, (ssl.SSLError, OSError))


async def test_renewal_comes_between_60_and_90_percent_of_the_ttl(tmp_path):
    source = LocalIdentitySource(tmp_path / "mesh", "web", cert_ttl=2)
    first = await source.fetch(None)
    started = time.monotonic()
    second = await source.fetch(first)
    waited = time.monotonic() - started
    assert 1.1 <= waited <= 2.0  # 1.2..1.8 s, with room for a busy machine
    assert second.serial != first.serial and second.key_pem != first.key_pem
    assert second.not_after > first.not_after and second.roots_pem == first.roots_pem


async def test_renewal_times_are_spread_over_the_window(tmp_path):
    source = LocalIdentitySource(tmp_path / "mesh", "web", cert_ttl=1000)
    fractions = []
    for _ in range(30):
        before = time.time()
        identity = await source.fetch(None)
        fractions.append((source.renewal_time(identity) - before) / 1000)
        # asked again for the same leaf, the same time: a retried fetch does not re-draw
        assert source.renewal_time(identity) == source.renewal_time(identity)
    assert all(0.6 <= f <= 0.9 + 0.001 for f in fractions)
    assert max(fractions) - min(fractions) > 0.05


async def test_an_identity_past_its_renewal_time_is_renewed_at_once(tmp_path):
    source = LocalIdentitySource(tmp_path / "mesh", "web", cert_ttl=3600)
    ca_cert = x509.load_pem_x509_certificate((await source.fetch(None)).roots_pem)
    ca_key = certs.load_key((tmp_path / "mesh" / "mesh-ca.key").read_bytes())
    assert isinstance(ca_key, certs.ISSUER_KEY_TYPES)
    leaf, key = certs.make_leaf(ca_cert, ca_key, source.spiffe_id, ttl=3600, now=time.time() - 3500)
    old = certs.identity_from_pem(
        certs.cert_to_pem(leaf), certs.key_to_pem(key), certs.cert_to_pem(ca_cert), "local"
    )
    renewed = await asyncio.wait_for(source.fetch(old), 2)
    assert renewed.not_after > old.not_after + 3000


def _replace(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


async def test_a_ca_replaced_on_disk_is_picked_up_once_both_files_are_in(tmp_path):
    ca_dir = tmp_path / "mesh"
    source = LocalIdentitySource(ca_dir, "web", cert_ttl=3600, poll=0.05)
    current = await source.fetch(None)
    renewal = asyncio.create_task(source.fetch(current))
    await asyncio.sleep(0.15)
    assert not renewal.done()  # nothing changed: no renewal for an hour

    new_cert, new_key = certs.make_ca("micro-sidecar.local")
    _replace(ca_dir / "mesh-ca.pem", certs.cert_to_pem(new_cert), 0o644)  # the operator, halfway
    await asyncio.sleep(0.25)
    assert not renewal.done()  # a new certificate beside the old key is waited out
    _replace(ca_dir / "mesh-ca.key", certs.key_to_pem(new_key), 0o600)
    renewed = await asyncio.wait_for(renewal, 2)
    assert renewed.roots_pem == certs.cert_to_pem(new_cert)
    x509.load_pem_x509_certificate(renewed.chain_pem).verify_directly_issued_by(new_cert)

    # touched but unchanged: no new leaf
    os.utime(ca_dir / "mesh-ca.pem")
    again = asyncio.create_task(source.fetch(renewed))
    await asyncio.sleep(0.2)
    assert not again.done()
    again.cancel()  # cancelling a waiting fetch is safe
    with pytest.raises(asyncio.CancelledError):
        await again


async def test_ca_files_that_cannot_be_used_are_named_and_never_quoted(tmp_path):
    ca_dir = tmp_path / "mesh"
    identity = await LocalIdentitySource(ca_dir, "web").fetch(None)
    ca_key = (ca_dir / "mesh-ca.key").read_bytes()
    messages = []

    async def fails(match: str) -> None:
        with pytest.raises(IdentityUnavailable, match=match) as caught:
            await LocalIdentitySource(ca_dir, "web").fetch(None)
        messages.append(str(caught.value))

    os.chmod(ca_dir / "mesh-ca.key", 0o644)
    await fails(r"mesh-ca.key has mode 644; it must be 600")
    os.chmod(ca_dir / "mesh-ca.key", 0o600)

    (ca_dir / "mesh-ca.key").write_bytes(ca_key.replace(ca_key.splitlines()[2], b"B" * 64))
    await fails(r"local CA key .*mesh-ca.key: not an unencrypted PEM private key")
    (ca_dir / "mesh-ca.key").write_bytes(certs.key_to_pem(certs.new_key()))
    await fails(r"local CA key .*mesh-ca.key does not belong to .*mesh-ca.pem")
    (ca_dir / "mesh-ca.key").write_bytes(ca_key)

    (ca_dir / "mesh-ca.pem").write_bytes(identity.chain_pem)  # a leaf is no CA
    await fails(r"local CA key .*mesh-ca.key does not belong|is not a CA")
    (ca_dir / "mesh-ca.pem").unlink()
    await fails(r"mesh-ca.key exists but .*mesh-ca.pem does not")

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(IdentityUnavailable, match=r"local CA in .*file/mesh") as caught:
        await LocalIdentitySource(tmp_path / "file" / "mesh", "web").fetch(None)
    messages.append(str(caught.value))

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(IdentityUnavailable, match=r"open is owned by uid .* mode 777") as caught:
        await LocalIdentitySource(open_dir, "web").fetch(None)
    messages.append(str(caught.value))

    for message in messages:
        assert_no_key(message, ca_key, identity.key_pem)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
async def test_a_ca_directory_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(IdentityUnavailable, match="owned by uid 12345"):
        await LocalIdentitySource(theirs, "web").fetch(None)
    assert not (theirs / "mesh-ca.key").exists()


def test_bad_arguments_fail_at_construction(tmp_path):
    for service in ("", "a/b"):
        with pytest.raises(ValueError, match="no SPIFFE ID"):
            LocalIdentitySource(tmp_path, service)
    with pytest.raises(ValueError, match="no SPIFFE ID"):
        LocalIdentitySource(tmp_path, "web", trust_domain="Upper.Case")
    with pytest.raises(ValueError, match="must be positive"):
        LocalIdentitySource(tmp_path, "web", cert_ttl=0)
