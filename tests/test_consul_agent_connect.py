"""The Consul test agent's Connect API over real HTTP: the CA with real certificates, blocking leaf
and roots queries, authorize, intentions and their precedence, ACLs, and the CA's fault switches."""

from __future__ import annotations

import json
import ssl
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store

from tests.consul_agent import BackgroundAgent
from tests.test_consul_agent import Reply, call


def leaf(agent: BackgroundAgent, service: str, query: str = "", token: str | None = None) -> Reply:
    return call(agent, "GET", f"/v1/agent/connect/ca/leaf/{service}{query}", token=token, timeout=15)


def roots(agent: BackgroundAgent, query: str = "", token: str | None = None) -> Reply:
    return call(agent, "GET", f"/v1/agent/connect/ca/roots{query}", token=token, timeout=15)


def intention(agent: BackgroundAgent, method: str, src: str, dst: str, body: Any = None, **kw: Any) -> Reply:
    return call(agent, method, f"/v1/connect/intentions/exact?source={src}&destination={dst}", body, **kw)


def verify(chain_pem: str, trusted_pem: str) -> x509.Certificate:
    """Path validation as a TLS server validates a client certificate; returns the leaf."""
    chain = x509.load_pem_x509_certificates(chain_pem.encode())
    store = Store(x509.load_pem_x509_certificates(trusted_pem.encode()))
    PolicyBuilder().store(store).build_client_verifier().verify(chain[0], chain[1:])
    return chain[0]


def in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        out["reply"] = fn()
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# -- the CA ------------------------------------------------------------------------------------


def test_roots_and_leaf_are_real_certificates_that_verify(consul_agent):
    agent = consul_agent
    reply = roots(agent)
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"ActiveRootID", "TrustDomain", "Roots"}
    (root,) = body["Roots"]
    assert root["ID"] == body["ActiveRootID"] and root["Active"] is True
    assert body["TrustDomain"].endswith(".consul") and len(body["TrustDomain"]) == 36 + 7
    assert root["ModifyIndex"] == reply.index
    assert {"Name", "SerialNumber", "SigningKeyID", "NotBefore", "NotAfter", "IntermediateCerts"} <= set(root)
    root_cert = x509.load_pem_x509_certificate(root["RootCert"].encode())
    assert root_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(
        root_cert.public_key().curve,
        type(x509.load_pem_x509_certificate(root["IntermediateCerts"][0].encode()).public_key().curve),
    )
    assert call(agent, "GET", "/v1/connect/ca/roots").json() == body

    first = leaf(agent, "web")
    assert first.status == 200
    issued = first.json()
    trust_domain = body["TrustDomain"]
    assert issued["Service"] == "web"
    assert issued["ServiceURI"] == f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/web"
    assert first.index == issued["ModifyIndex"] > reply.index
    cert = verify(issued["CertPEM"], root["RootCert"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [g.value for g in san] == [issued["ServiceURI"]]  # the SPIFFE ID is the only SAN
    assert cert.public_key().curve.name == "secp256r1"
    assert issued["SerialNumber"] == ":".join(
        f"{b:02x}" for b in cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8, "big")
    )
    key = serialization.load_pem_private_key(issued["PrivateKeyPEM"].encode(), None)
    assert key.public_key() == cert.public_key()
    assert "BEGIN EC PRIVATE KEY" in issued["PrivateKeyPEM"]
    # Cached: the same certificate until it is due for renewal.
    assert leaf(agent, "web").json()["SerialNumber"] == issued["SerialNumber"]
    assert leaf(agent, "api").json()["SerialNumber"] != issued["SerialNumber"]

    pem = call(agent, "GET", "/v1/connect/ca/roots?pem=true")
    assert pem.headers["Content-Type"] == "application/pem-certificate-chain"
    assert pem.text.count("BEGIN CERTIFICATE") == 1 + len(root["IntermediateCerts"])


def test_a_tls_handshake_between_two_consul_leaves(consul_agent, tmp_path: Path):
    agent = consul_agent
    root_pem = roots(agent).json()["Roots"][0]["RootCert"]

    def context(service: str, server: bool) -> ssl.SSLContext:
        issued = leaf(agent, service).json()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=root_pem)
        cert, key = tmp_path / f"{service}.pem", tmp_path / f"{service}.key"
        cert.write_text(issued["CertPEM"])
        key.write_text(issued["PrivateKeyPEM"])
        ctx.load_cert_chain(cert, key)
        return ctx

    bios = {name: (ssl.MemoryBIO(), ssl.MemoryBIO()) for name in ("server", "client")}
    server = context("db", True).wrap_bio(*bios["server"], server_side=True)
    client = context("web", False).wrap_bio(*bios["client"])
    for _ in range(10):
        for side, mine, theirs in ((client, "client", "server"), (server, "server", "client")):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = bios[mine][1].read()
            if data:
                bios[theirs][0].write(data)
    uri = lambda tls: dict(tls.getpeercert()["subjectAltName"])["URI"]  # noqa: E731
    assert uri(client).endswith("/svc/db") and uri(server).endswith("/svc/web")


def test_leaf_blocking_query_returns_when_renewal_is_due(consul_agent_factory):
    agent = consul_agent_factory(leaf_cert_ttl=2)
    first = leaf(agent, "web")
    issued = first.json()
    # Nothing new within the wait: the same certificate, the same index.
    started = time.monotonic()
    same = leaf(agent, "web", f"?index={first.index}&wait=200ms")
    assert same.json()["SerialNumber"] == issued["SerialNumber"] and same.index == first.index
    # Renewal comes between 60% and 90% of the 2 s the leaf was issued for.
    renewed = leaf(agent, "web", f"?index={first.index}&wait=10s")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 4.0, elapsed  # renewal due at 1.2-1.8 s; slack for a loaded machine
    assert renewed.index > first.index and renewed.json()["SerialNumber"] != issued["SerialNumber"]
    # An older index answers at once.
    assert leaf(agent, "web", f"?index={first.index}&wait=10s").index == renewed.index


def test_rotate_root_releases_blocked_queries_and_keeps_the_old_root(consul_agent_factory):
    agent = consul_agent_factory(leaf_cert_ttl=1.5)
    before = roots(agent)
    old_root = before.json()["Roots"][0]
    first = leaf(agent, "web")
    roots_thread, roots_out = in_background(lambda: roots(agent, f"?index={before.index}&wait=10s"))
    leaf_thread, leaf_out = in_background(lambda: leaf(agent, "web", f"?index={first.index}&wait=10s"))
    time.sleep(0.2)
    agent.set_fault("rotate_root")
    roots_thread.join(5)
    leaf_thread.join(5)
    after, renewed = roots_out["reply"], leaf_out["reply"]
    body = after.json()
    assert after.index > before.index and len(body["Roots"]) == 2
    old, new = body["Roots"]
    assert old["ID"] == old_root["ID"] and old["Active"] is False
    assert new["Active"] is True and body["ActiveRootID"] == new["ID"] != old["ID"]
    assert renewed.index > after.index  # the root is published before the leaf it signs
    chain = renewed.json()["CertPEM"]
    assert chain.count("BEGIN CERTIFICATE") == 3  # leaf, intermediate, new root cross-signed by the old
    verify(chain, new["RootCert"])
    verify(chain, old["RootCert"])  # peers that trust only the old root accept it
    # The old root goes away after twice the leaf TTL (shortened here to keep the test short).
    agent.set_fault("leaf_ttl=0.5")
    deadline = time.monotonic() + 5
    while len(roots(agent).json()["Roots"]) == 2:
        assert time.monotonic() < deadline, "the old root was never pruned"
        time.sleep(0.1)
    assert roots(agent).json()["Roots"][0]["ID"] == new["ID"]


def test_leaf_ttl_fault_reissues_long_lived_leaves(consul_agent):
    agent = consul_agent
    first = leaf(agent, "web")
    thread, out = in_background(lambda: leaf(agent, "web", f"?index={first.index}&wait=10s"))
    time.sleep(0.1)
    agent.set_fault("leaf_ttl=30")
    thread.join(5)
    issued = out["reply"].json()
    cert = x509.load_pem_x509_certificate(issued["CertPEM"].encode())
    lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    assert 85 <= lifetime <= 92  # 30 s plus the minute NotBefore is backdated
    with pytest.raises(ValueError):
        agent.set_fault("leaf_ttl=soon")


def test_connect_faults_through_the_control_port(consul_agent):
    agent = consul_agent

    async def control() -> int:
        return await agent.agent.start_control(0)

    port = agent._submit(control())
    before = roots(agent).json()["ActiveRootID"]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/fault/rotate_root", method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    assert roots(agent).json()["ActiveRootID"] != before


def test_wipe_makes_a_new_ca_and_reset_index_restamps_it(consul_agent):
    agent = consul_agent
    domain = roots(agent).json()["TrustDomain"]
    first = leaf(agent, "web")
    intention(agent, "PUT", "web", "db", {"Action": "allow"})
    agent.reset_index()
    assert roots(agent).index < first.index and leaf(agent, "web").index < first.index
    agent.wipe()
    assert roots(agent).json()["TrustDomain"] != domain
    assert call(agent, "GET", "/v1/connect/intentions").json() == []
    assert (
        leaf(agent, "web").json()["ServiceURI"].startswith(f"spiffe://{roots(agent).json()['TrustDomain']}/")
    )


# -- authorize and intentions --------------------------------------------------------------------


def test_intentions_crud_by_name(consul_agent):
    agent = consul_agent
    assert intention(agent, "GET", "web", "db").status == 404
    assert intention(agent, "GET", "web", "db").text == "Intention not found"
    reply = intention(agent, "PUT", "web", "db", {"Action": "allow", "Description": "web reads db"})
    assert reply.status == 200 and reply.json() is True
    got = intention(agent, "GET", "web", "db")
    ixn = got.json()
    assert ixn["SourceName"] == "web" and ixn["DestinationName"] == "db" and ixn["Action"] == "allow"
    assert ixn["Precedence"] == 9 and ixn["SourceNS"] == ixn["DestinationNS"] == "default"
    assert ixn["Description"] == "web reads db" and ixn["SourceType"] == "consul" and "ID" not in ixn
    # Upsert keeps CreateIndex.
    intention(agent, "PUT", "web", "db", {"Action": "deny"})
    again = intention(agent, "GET", "web", "db").json()
    assert again["Action"] == "deny" and again["CreateIndex"] == ixn["CreateIndex"] < again["ModifyIndex"]
    assert intention(agent, "DELETE", "web", "db").json() is True
    assert intention(agent, "DELETE", "web", "db").json() is True  # idempotent
    assert intention(agent, "GET", "web", "db").status == 404

    assert intention(agent, "PUT", "web", "db", {"Action": "maybe"}).status == 500
    assert intention(agent, "PUT", "web", "db", b"{").status == 400
    assert intention(agent, "PUT", "we*", "db", {"Action": "allow"}).status == 500
    missing = call(agent, "PUT", "/v1/connect/intentions/exact?source=web", {"Action": "allow"})
    assert missing.status == 500 and "'destination' not set" in missing.text
    assert call(agent, "GET", "/v1/connect/intentions/match?name=db").status == 500


def test_precedence_in_match_list_check_and_authorize(consul_agent):
    agent = consul_agent
    for src, dst, action in (
        ("*", "*", "deny"),
        ("web", "*", "deny"),
        ("*", "db", "deny"),
        ("web", "db", "allow"),
    ):
        assert intention(agent, "PUT", src, dst, {"Action": action}).status == 200
    match = call(agent, "GET", "/v1/connect/intentions/match?by=destination&name=db").json()
    assert [(i["SourceName"], i["DestinationName"], i["Precedence"]) for i in match["db"]] == [
        ("web", "db", 9),
        ("*", "db", 8),
        ("web", "*", 6),
        ("*", "*", 5),
    ]
    by_source = call(agent, "GET", "/v1/connect/intentions/match?by=source&name=web&name=api").json()
    assert [(i["SourceName"], i["DestinationName"]) for i in by_source["web"]] == [
        ("web", "db"),
        ("*", "db"),
        ("web", "*"),
        ("*", "*"),
    ]
    assert [(i["SourceName"], i["DestinationName"]) for i in by_source["api"]] == [("*", "db"), ("*", "*")]
    listed = call(agent, "GET", "/v1/connect/intentions").json()
    assert [i["Precedence"] for i in listed] == [9, 8, 6, 5]
    filtered = call(
        agent, "GET", "/v1/connect/intentions?filter=" + urllib.request.quote('SourceName == "web"')
    )
    assert len(filtered.json()) == 2

    def check(src: str, dst: str) -> bool:
        return call(agent, "GET", f"/v1/connect/intentions/check?source={src}&destination={dst}").json()[
            "Allowed"
        ]

    assert check("web", "db") is True and check("api", "db") is False and check("web", "cache") is False

    def authorize(src: str, dst: str) -> dict[str, Any]:
        domain = roots(agent).json()["TrustDomain"]
        body = {
            "Target": dst,
            "ClientCertURI": f"spiffe://{domain}/ns/default/dc/dc1/svc/{src}",
            "ClientCertSerial": "01",
        }
        reply = call(agent, "POST", "/v1/agent/connect/authorize", body)
        assert reply.status == 200
        return reply.json()

    assert authorize("web", "db") == {
        "Authorized": True,
        "Reason": "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)",
    }
    assert authorize("api", "db")["Authorized"] is False
    intention(agent, "DELETE", "*", "*")
    intention(agent, "DELETE", "*", "db")
    # No intention matches: ACLs are off, so the default is allow.
    assert authorize("api", "db") == {"Authorized": True, "Reason": "Default behavior configured by ACLs"}
    assert call(agent, "PUT", "/v1/agent/connect/authorize", {}).status == 405
    assert call(agent, "POST", "/v1/agent/connect/authorize", {"ClientCertURI": "x"}).status == 400
    bad = call(agent, "POST", "/v1/agent/connect/authorize", {"Target": "db", "ClientCertURI": "https://x"})
    assert bad.status == 400 and bad.text == "ClientCertURI not a valid Connect identifier"


def test_match_blocks_until_an_intention_it_lists_changes(consul_agent):
    agent = consul_agent
    intention(agent, "PUT", "web", "db", {"Action": "allow"})
    first = call(agent, "GET", "/v1/connect/intentions/match?by=destination&name=db")
    thread, out = in_background(
        lambda: call(
            agent, "GET", f"/v1/connect/intentions/match?by=destination&name=db&index={first.index}&wait=5s"
        )
    )
    time.sleep(0.2)
    intention(agent, "PUT", "web", "cache", {"Action": "deny"})  # not listed for db: no wakeup
    time.sleep(0.3)
    assert thread.is_alive()
    changed_at = time.monotonic()
    intention(agent, "PUT", "api", "db", {"Action": "deny"})
    thread.join(5)
    assert out["at"] - changed_at < 1.0
    assert out["reply"].index > first.index
    assert [i["SourceName"] for i in out["reply"].json()["db"]] == ["api", "web"]


def test_default_intention_policy_is_shown_and_used(consul_agent_factory):
    agent = consul_agent_factory(default_intention_policy="deny")
    debug = call(agent, "GET", "/v1/agent/self").json()["DebugConfig"]
    assert (
        debug["DefaultIntentionPolicy"] == "deny"
        and debug["ACLResolverSettings"]["ACLDefaultPolicy"] == "allow"
    )
    assert call(agent, "GET", "/v1/connect/intentions/check?source=web&destination=db").json() == {
        "Allowed": False
    }
    domain = roots(agent).json()["TrustDomain"]
    body = {"Target": "db", "ClientCertURI": f"spiffe://{domain}/ns/default/dc/dc1/svc/web"}
    assert call(agent, "POST", "/v1/agent/connect/authorize", body).json() == {
        "Authorized": False,
        "Reason": "Default intention policy",
    }
    with pytest.raises(ValueError):
        BackgroundAgent(default_intention_policy="maybe").start()


# -- ACLs ---------------------------------------------------------------------------------------


def test_acl_leaf_needs_service_write(consul_agent_acl):
    agent = consul_agent_acl
    assert roots(agent).status == 200  # roots need no ACL, not even a known token
    assert roots(agent, token="not-a-token").status == 200
    anonymous = leaf(agent, "web")
    assert anonymous.status == 403
    assert anonymous.text.startswith(
        "Permission denied: anonymous token lacks permission 'service:write' on \"web\""
    )
    accessor = agent.add_token("web-writer", {"service_write": ["web"]})
    assert leaf(agent, "web", token="web-writer").status == 200
    other = leaf(agent, "db", token="web-writer")
    assert other.status == 403
    assert (
        other.text
        == f"Permission denied: token with AccessorID '{accessor}' lacks permission 'service:write' on \"db\""
    )
    assert leaf(agent, "web", token="not-a-token").status == 403


def test_acl_intentions_read_write_and_defaults(consul_agent_acl):
    agent = consul_agent_acl
    admin = agent.token
    agent.add_token("db-owner", {"service_write": ["db"]})  # implies intentions:read on db
    agent.add_token("db-admin", {"service": {"db": {"policy": "read", "intentions": "write"}}})
    agent.add_token("reader", {"service_read": ["*"]})
    assert intention(agent, "PUT", "web", "db", {"Action": "allow"}).text == "Permission denied"
    assert intention(agent, "PUT", "web", "db", {"Action": "allow"}, token="db-owner").status == 403
    assert intention(agent, "PUT", "web", "db", {"Action": "allow"}, token="db-admin").json() is True
    assert intention(agent, "PUT", "web", "*", {"Action": "allow"}, token="db-admin").status == 403
    assert intention(agent, "PUT", "web", "api", {"Action": "deny"}, token=admin).status == 200

    match = call(agent, "GET", "/v1/connect/intentions/match?by=destination&name=db", token="db-owner")
    assert match.status == 200 and [i["SourceName"] for i in match.json()["db"]] == ["web"]
    denied = call(agent, "GET", "/v1/connect/intentions/match?by=destination&name=api", token="db-owner")
    assert denied.status == 403 and "lacks permission 'intention:read' on \"api\"" in denied.text
    listed = call(agent, "GET", "/v1/connect/intentions", token="db-owner")
    assert [i["DestinationName"] for i in listed.json()] == ["db"]
    assert listed.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert intention(agent, "GET", "web", "api", token="db-owner").status == 403
    assert len(call(agent, "GET", "/v1/connect/intentions", token="reader").json()) == 2

    # check wants service:read on the destination; unmatched pairs get the ACL default (deny).
    assert call(agent, "GET", "/v1/connect/intentions/check?source=web&destination=db").status == 403
    check = call(agent, "GET", "/v1/connect/intentions/check?source=api&destination=db", token="reader")
    assert check.json() == {"Allowed": False}
    domain = roots(agent).json()["TrustDomain"]
    body = {"Target": "db", "ClientCertURI": f"spiffe://{domain}/ns/default/dc/dc1/svc/api"}
    assert call(agent, "POST", "/v1/agent/connect/authorize", body, token="reader").status == 403
    authorized = call(agent, "POST", "/v1/agent/connect/authorize", body, token="db-owner").json()
    assert authorized == {"Authorized": False, "Reason": "Default behavior configured by ACLs"}
    assert (
        call(agent, "GET", "/v1/agent/self", token=admin).json()["DebugConfig"]["ACLResolverSettings"][
            "ACLDefaultPolicy"
        ]
        == "deny"
    )


def test_pem_files_load_into_ssl_as_a_chain(consul_agent):
    # What a sidecar does with the answer: CertPEM (leaf + intermediates) and the key as files.
    issued = leaf(consul_agent, "web").json()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "c.pem"), Path(tmp, "k.pem")
        cert.write_text(issued["CertPEM"])
        key.write_text(issued["PrivateKeyPEM"])
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    assert json.loads(json.dumps(issued)) == issued
