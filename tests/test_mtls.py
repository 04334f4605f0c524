"""Mutual TLS between real sidecars on the local registry and its CA (issue 13), seen from
outside: the apps' headers, stock clients (curl, openssl s_client) with certificates of
the mesh, of another CA, expired, and of the wrong service, strict and permissive modes,
--allow-from, and rotation under load."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.identity.base import SpiffeId
from sidecar.identity.certs import cert_to_pem, key_to_pem, load_key, make_ca, make_leaf
from sidecar.registry.base import CheckSpec, Instance
from sidecar.registry.local import LocalRegistry
from tests.helpers import http, wait_for

DOMAIN = "micro-sidecar.local"


def seen_headers(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def uri(service: str) -> str:
    return SpiffeId(DOMAIN, service).uri


def mint(registry_path: Path, out: Path, service: str, *, ttl: float = 3600, now: float | None = None):
    """A leaf for `service` from the mesh CA the sidecars made beside the registry file:
    (cert file, key file, CA file)."""
    ca_dir = registry_path.parent
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "mesh-ca.pem").read_bytes())
    ca_key = load_key((ca_dir / "mesh-ca.key").read_bytes())
    cert, key = make_leaf(ca_cert, ca_key, SpiffeId(DOMAIN, service), ttl=ttl, now=now)  # type: ignore[arg-type]
    return _write(out, service, cert, key, ca_dir / "mesh-ca.pem")


def _write(out: Path, name: str, cert: x509.Certificate, key, ca_file: Path):
    out.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = out / f"{name}.pem", out / f"{name}.key"
    cert_file.write_bytes(cert_to_pem(cert))
    key_file.write_bytes(key_to_pem(key))
    key_file.chmod(0o600)
    return cert_file, key_file, ca_file


def curl(url: str, cert: Path | None, key: Path | None, ca: Path, *extra: str) -> tuple[int, int, str]:
    """(curl exit code, HTTP status, body) of one HTTPS request with a client certificate."""
    args = ["curl", "-sS", "--max-time", "10", "--cacert", str(ca), "-o", "-", "-w", "\n%{http_code}"]
    if cert is not None:
        args += ["--cert", str(cert), "--key", str(key)]
    # the sidecar's certificate names a SPIFFE ID, not a host: curl checks the chain only
    args += ["--resolve", f"orders.mesh:{url.rsplit(':', 1)[1].split('/')[0]}:127.0.0.1", "-k", *extra]
    done = subprocess.run([*args, url.replace("127.0.0.1", "orders.mesh")], capture_output=True, text=True)
    body, _, code = done.stdout.rpartition("\n")
    return done.returncode, int(code or 0), body


def denied_count(sc, code: str) -> float:
    _, _, body = http("GET", f"{sc.admin}/metrics")
    match = re.search(rf'sidecar_inbound_denied_total{{code="{code}"}} ([0-9.]+)', body.decode())
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def mesh(start_app, start_sidecar):
    """orders and web, each an echo app behind its own sidecar; `args` go to orders'."""

    def make(*orders_args: str, web_args: tuple[str, ...] = ()):
        orders_app = start_app("orders")
        orders = start_sidecar(orders_app.port, "--name", "orders", *orders_args)
        web_app = start_app("web")
        web = start_sidecar(web_app.port, "--name", "web", *web_args)
        return orders, web

    return make


def test_a_mesh_call_is_mutual_tls_and_the_app_learns_its_caller(mesh, registry_path, tmp_path):
    orders, web = mesh()
    forged = {"X-Sidecar-Caller": "admin", "X-Forwarded-Client-Cert": f"By=x;Hash=00;URI={uri('admin')}"}
    status, _, body = http("GET", f"{web.outbound}/orders/who", headers=forged)
    assert status == 200
    got = seen_headers(body)
    assert got["x-forwarded-proto"] == "https"
    assert got["x-sidecar-caller"] == "web"
    by, hash_part, uri_part = got["x-forwarded-client-cert"].split(";")
    assert by == f"By={uri('orders')}" and uri_part == f"URI={uri('web')}"
    # the hash is web's certificate: the one web's inbound port presents to a TLS client
    cert, key, ca = mint(registry_path, tmp_path, "probe")
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", web.inbound_port)) as raw:
        with ctx.wrap_socket(raw) as tls:
            web_cert = tls.getpeercert(binary_form=True)
            assert ("URI", uri("web")) in tls.getpeercert()["subjectAltName"]
    assert hash_part == f"Hash={hashlib.sha256(web_cert).hexdigest()}"
    # the access log of orders' sidecar names the caller
    wait_for(lambda: '"caller":"web"' in orders.output(), 5, what="caller in the access log")
    ident = orders.status()["identity"]
    assert ident["identity"]["spiffe_id"] == uri("orders") and ident["identity"]["valid"]
    # no private key anywhere an operator looks, and the CA key readable only by its owner
    key_pem = (registry_path.parent / "mesh-ca.key").read_bytes()
    key_body = key_pem.split(b"\n")[1].decode()
    _, _, metrics = http("GET", f"{orders.admin}/metrics")
    for text in (json.dumps(orders.status()), orders.output(), web.output(), metrics.decode()):
        assert "PRIVATE KEY" not in text and key_body not in text
    assert (registry_path.parent / "mesh-ca.key").stat().st_mode & 0o077 == 0


def test_permissive_takes_plaintext_without_a_caller(mesh):
    orders, _ = mesh()
    status, _, body = http("GET", f"{orders.inbound}/plain", headers={"X-Sidecar-Caller": "web"})
    assert status == 200
    got = seen_headers(body)
    assert "x-sidecar-caller" not in got and "x-forwarded-client-cert" not in got
    assert got["x-forwarded-proto"] == "http"


def test_strict_refuses_plaintext_and_certificates_the_mesh_did_not_issue(mesh, registry_path, tmp_path):
    orders, web = mesh("--mtls", "strict")
    status, headers, body = http("GET", f"{orders.inbound}/plain")
    assert status == 403 and headers["X-Sidecar-Error"] == "mtls_required"
    assert json.loads(body)["sidecar"] == "orders"
    assert denied_count(orders, "mtls_required") == 1
    # mesh callers still get through
    assert http("GET", f"{web.outbound}/orders/x")[0] == 200
    url = f"https://127.0.0.1:{orders.inbound_port}/stock"
    # a certificate of another CA, valid otherwise: refused in the handshake
    other_cert, other_key = make_ca("evil.example")
    leaf, leaf_key = make_leaf(other_cert, other_key, SpiffeId("evil.example", "web"), ttl=3600)
    stranger = _write(tmp_path / "other", "web", leaf, leaf_key, tmp_path / "unused")
    code, _, _ = curl(url, stranger[0], stranger[1], registry_path.parent / "mesh-ca.pem")
    assert code != 0
    # an expired certificate from the mesh CA itself: refused too
    expired = mint(registry_path, tmp_path / "old", "web", ttl=60, now=time.time() - 7200)
    code, _, _ = curl(url, *expired)
    assert code != 0
    # no certificate at all
    code, _, _ = curl(url, None, None, registry_path.parent / "mesh-ca.pem")
    assert code != 0
    assert orders.status()["identity"]["tls_failures"] >= 3
    # a valid certificate of the mesh, from curl: allowed, and the app learns who it is
    good = mint(registry_path, tmp_path / "good", "billing")
    code, status, body = curl(url, *good)
    assert (code, status) == (0, 200)
    assert seen_headers(body.encode())["x-sidecar-caller"] == "billing"


def test_openssl_sees_the_sidecar_identity_and_a_verified_chain(mesh, registry_path, tmp_path):
    orders, _ = mesh()
    cert, key, ca = mint(registry_path, tmp_path, "billing")
    done = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{orders.inbound_port}",
            "-cert", str(cert), "-key", str(key), "-CAfile", str(ca), "-verify_return_error", "-showcerts",
        ],
        input="", capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in done.stdout, done.stdout + done.stderr
    assert "TLSv1.3" in done.stdout
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", done.stdout, re.S)
    assert pem is not None
    served = x509.load_pem_x509_certificate(pem.group(0).encode())
    sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(name.value) for name in sans] == [uri("orders")]


def test_allow_from_lets_only_the_named_services_call(mesh, registry_path, tmp_path):
    orders, web = mesh("--allow-from", "billing")
    status, headers, body = http("GET", f"{web.outbound}/orders/x")
    assert status == 403 and headers["X-Sidecar-Error"] == "permission_denied"
    message = json.loads(body)["message"]
    assert uri("web") in message and "billing" in message
    assert denied_count(orders, "permission_denied") == 1
    assert orders.status()["identity"]["denied"] == 1
    wait_for(lambda: '"status":403' in orders.output() and '"caller":"web"' in orders.output(), 5)
    billing = mint(registry_path, tmp_path, "billing")
    code, status, _ = curl(f"https://127.0.0.1:{orders.inbound_port}/x", *billing)
    assert (code, status) == (0, 200)


def test_a_caller_refuses_an_instance_that_presents_another_service(start_app, start_sidecar, registry_path):
    billing_app = start_app("billing")
    billing = start_sidecar(billing_app.port, "--name", "billing")
    web_app = start_app("web")
    web = start_sidecar(web_app.port, "--name", "web")

    async def misregister() -> None:  # "orders" pointing at billing's sidecar
        reg = LocalRegistry(registry_path)
        try:
            fake = Instance(
                id="orders-fake", name="orders", address="127.0.0.1", port=billing.inbound_port,
                meta={"mtls": "permissive"},
            )  # fmt: skip
            await reg.register(fake, CheckSpec(ttl=300, deregister_after=300), "passing", "test")
        finally:
            await reg.close()

    asyncio.run(misregister())
    status, headers, body = http("GET", f"{web.outbound}/orders/x")
    assert status == 502 and headers["X-Sidecar-Error"] == "peer_identity_mismatch"
    assert uri("billing") in json.loads(body)["message"]
    assert billing.status()["requests"]["inbound"] == 0  # nothing was sent to it


def test_a_sidecar_without_mtls_is_called_in_plaintext_unless_strict(mesh):
    orders, web = mesh("--mtls", "off")
    status, _, body = http("GET", f"{web.outbound}/orders/x")
    assert status == 200 and "x-sidecar-caller" not in seen_headers(body)
    assert orders.status()["identity"] is None


def test_a_strict_caller_does_not_call_a_plaintext_sidecar(mesh):
    _, web = mesh("--mtls", "off", web_args=("--mtls", "strict"))
    status, headers, _ = http("GET", f"{web.outbound}/orders/x")
    assert status == 502 and headers["X-Sidecar-Error"] == "peer_without_mtls"


def test_leaf_rotation_under_load_fails_no_request(mesh):
    orders, web = mesh("--cert-ttl", "2", web_args=("--cert-ttl", "2"))
    results: list[int] = []
    hashes: set[str] = set()
    stop = time.monotonic() + 5.0  # about three rotations each

    def client() -> None:
        while time.monotonic() < stop:
            status, _, body = http("POST", f"{web.outbound}/orders/load", body=b"x" * 1000)
            results.append(status)
            if status == 200:
                hashes.add(seen_headers(body)["x-forwarded-client-cert"].split(";")[1])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}
    assert orders.status()["identity"]["rotations"] >= 2
    assert web.status()["identity"]["rotations"] >= 2
    assert len(hashes) >= 2  # web's pools replaced their connections with new handshakes
