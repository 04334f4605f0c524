"""--identity files with real sidecars: PEM files written by something else (here the test,
standing in for spiffe-helper or cert-manager), picked up when they rotate, and an expired
certificate reported and never used."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sidecar.identity.base import SpiffeId
from sidecar.identity.certs import cert_to_pem, key_to_pem, make_ca, make_leaf
from tests.helpers import http, wait_for

DOMAIN = "example.org"


class Issuer:
    """A CA outside the sidecars, writing each service's files as an agent would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca, self.ca_key = make_ca(DOMAIN)
        self.ca_file = root / "ca.pem"
        root.mkdir(parents=True, exist_ok=True)
        self.ca_file.write_bytes(cert_to_pem(self.ca))

    def write(self, service: str, *, ttl: float = 3600, now: float | None = None) -> tuple[str, ...]:
        cert, key = make_leaf(self.ca, self.ca_key, SpiffeId(DOMAIN, service), ttl=ttl, now=now)
        cert_file, key_file = self.root / f"{service}.pem", self.root / f"{service}.key"
        # key first, then the certificate, each by rename: a reader may see the new key
        # with the old certificate for a moment (the source waits that out)
        for path, data in ((key_file, key_to_pem(key)), (cert_file, cert_to_pem(cert))):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        return ("--identity", "files", "--tls-cert", str(cert_file), "--tls-key", str(key_file),
                "--tls-ca", str(self.ca_file))  # fmt: skip


def test_files_identities_rotate_under_the_sidecars(start_app, start_sidecar, tmp_path):
    issuer = Issuer(tmp_path / "pki")
    orders_app = start_app("orders")
    start_sidecar(orders_app.port, "--name", "orders", *issuer.write("orders"))
    web_app = start_app("web")
    web = start_sidecar(web_app.port, "--name", "web", *issuer.write("web"))
    status, _, body = http("GET", f"{web.outbound}/orders/x")
    assert status == 200
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["x-sidecar-caller"] == "web"
    assert seen["x-forwarded-client-cert"].endswith(f"URI=spiffe://{DOMAIN}/ns/default/dc/local/svc/web")
    before = web.status()["identity"]["identity"]["serial"]
    assert web.status()["identity"]["source"]["kind"] == "files"
    issuer.write("web")
    wait_for(lambda: web.status()["identity"]["identity"]["serial"] != before, 10, what="the new files used")
    assert web.status()["identity"]["rotations"] == 1
    assert http("GET", f"{web.outbound}/orders/y")[0] == 200


def test_an_expired_certificate_is_reported_and_never_offered(start_app, start_sidecar, tmp_path):
    issuer = Issuer(tmp_path / "pki")
    orders_app = start_app("orders")
    orders = start_sidecar(orders_app.port, "--name", "orders", *issuer.write("orders"))
    web_app = start_app("web")
    stale = issuer.write("web", ttl=60, now=time.time() - 7200)
    web = start_sidecar(web_app.port, "--name", "web", *stale, ready=False)
    wait_for(lambda: web.status()["app"]["healthy"], 10, what="web's app healthy")
    code, body = web.ready()
    assert code == 503 and "no valid identity" in body["reason"]
    assert web.status()["identity"]["identity"]["valid"] is False
    _, _, metrics = http("GET", f"{web.admin}/metrics")
    expiry = [
        line for line in metrics.decode().splitlines() if line.startswith("sidecar_identity_expiry_seconds ")
    ]
    assert expiry and float(expiry[0].split()[1]) < -3600
    status, headers, _ = http("GET", f"{web.outbound}/orders/x")
    assert status == 503 and headers["X-Sidecar-Error"] == "identity_unavailable"
    assert orders.status()["requests"]["inbound"] == 0
    # a fresh certificate in the same files: picked up, and the calls work
    issuer.write("web")
    wait_for(lambda: web.ready()[0] == 200, 10, what="web ready with a valid certificate")
    assert http("GET", f"{web.outbound}/orders/x")[0] == 200
