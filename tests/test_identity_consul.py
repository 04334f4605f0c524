"""The consul identity source and Consul intentions, against the Consul test agent over real HTTP:
leaf and roots, a real mutual-TLS handshake between Consul-issued leaves, rotations, ACL refusals,
intentions with their precedence, changes while running, fail static and the default policy."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sidecar.identity.base import Identity, IdentityDenied, IdentityUnavailable, SpiffeId
from sidecar.identity.consul import ConsulIdentitySource, signed_by_roots
from sidecar.identity.intentions import ConsulIntentions
from sidecar.registry.base import CheckSpec, Instance, RegistryDenied, RegistryError
from sidecar.registry.consul import ConsulRegistry
from sidecar.registry.consul_settings import ConsulSettings
from tests.consul_agent import BackgroundAgent

SECRET = "5ec4e7-70ken-d0-n0t-l0g"


def http(agent: BackgroundAgent, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    request = urllib.request.Request(
        agent.url + path, data=None if body is None else json.dumps(body).encode(), method=method
    )
    if token or agent.token:
        request.add_header("X-Consul-Token", token or agent.token or "")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


def put_intention(agent: BackgroundAgent, source: str, destination: str, action: str) -> None:
    path = f"/v1/connect/intentions/exact?source={source}&destination={destination}"
    assert http(agent, "PUT", path, {"Action": action}) is True


def trust_domain(agent: BackgroundAgent) -> str:
    return http(agent, "GET", "/v1/agent/connect/ca/roots")["TrustDomain"]


async def open_registry(agent: BackgroundAgent, token: str | None = None, **options: Any) -> ConsulRegistry:
    registry = ConsulRegistry(ConsulSettings(agent.addr, token=token), timeout=2.0, **options)
    await registry.open()
    return registry


@pytest.fixture
async def registry(consul_agent):
    reg = await open_registry(consul_agent)
    yield reg
    await reg.close()


# -- the registry backend's additions ----------------------------------------------------------


async def test_register_as_connect_native_when_asked(consul_agent):
    check = CheckSpec(ttl=15.0, deregister_after=60.0)
    native = await open_registry(consul_agent, connect_native=True)
    plain = await open_registry(consul_agent)
    try:
        await native.register(Instance("web-1", "web", "127.0.0.1", 9001), check, "passing", "ok")
        await plain.register(Instance("api-1", "api", "127.0.0.1", 9002), check, "passing", "ok")
        services = consul_agent.services()
        assert services["web-1"]["Connect"] == {"Native": True}
        assert "Connect" not in services["api-1"]
        assert [e["Service"]["ID"] for e in http(consul_agent, "GET", "/v1/health/connect/web")] == ["web-1"]
        assert native.describe()["connect_native"] is True and plain.describe()["connect_native"] is False
    finally:
        await native.close()
        await plain.close()


async def test_api_get_and_api_request_share_the_backend_error_rules(consul_agent_acl):
    agent = consul_agent_acl
    agent.add_token(SECRET, {"service_write": ["web"]})
    registry = await open_registry(agent, token=SECRET)
    try:
        body, index = await registry.api_get("/v1/agent/connect/ca/roots")
        assert body["Roots"] and index > 0
        leaf, leaf_index = await registry.api_get("/v1/agent/connect/ca/leaf/web")
        started = time.monotonic()
        again, same = await registry.api_get("/v1/agent/connect/ca/leaf/web", index=leaf_index, wait=0.3)
        assert 0.25 < time.monotonic() - started < 2 and same == leaf_index
        assert again["SerialNumber"] == leaf["SerialNumber"]
        with pytest.raises(RegistryDenied) as denied:
            await registry.api_get("/v1/agent/connect/ca/leaf/db", needs="service:write on 'db'")
        assert "service:write on 'db'" in str(denied.value) and SECRET not in str(denied.value)
        with pytest.raises(RegistryError, match="404"):
            await registry.api_get("/v1/connect/intentions/exact", [("source", "a"), ("destination", "web")])
        answer = await registry.api_request(
            "POST",
            "/v1/agent/connect/authorize",
            body={"Target": "web", "ClientCertURI": leaf["ServiceURI"], "ClientCertSerial": "01"},
        )
        assert answer.status == 200 and answer.body["Authorized"] is False  # ACL default deny
        with pytest.raises(ValueError):
            await registry.api_get("agent/self")
    finally:
        await registry.close()


# -- the identity source ---------------------------------------------------------------------------


def contexts(identity: Identity, tmp: Path, server: bool, roots_pem: bytes | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=(roots_pem or identity.roots_pem).decode())
    name = f"{identity.spiffe_id.service}-{identity.serial}"
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.write_bytes(identity.chain_pem)
    key.write_bytes(identity.key_pem)
    ctx.load_cert_chain(cert, key)
    return ctx


async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, str]:
    """A real TLS handshake on loopback; (URI the client saw, URI the server saw)."""
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.set_result(dict(peer["subjectAltName"])["URI"])
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        client_saw = dict(writer.get_extra_info("peercert")["subjectAltName"])["URI"]
        server_saw = await asyncio.wait_for(seen, 5)
        writer.close()
        return client_saw, server_saw
    finally:
        server.close()
        await server.wait_closed()


async def test_leaf_and_roots_fetched_and_a_mutual_tls_handshake(consul_agent, registry, tmp_path):
    domain = trust_domain(consul_agent)
    web, db = ConsulIdentitySource(registry, "web"), ConsulIdentitySource(registry, "db")
    web_id, db_id = await web.fetch(None), await db.fetch(None)
    assert web_id.spiffe_id == SpiffeId(domain, "web", datacenter="dc1")
    assert web_id.source == "consul" and web_id.valid()
    assert web_id.chain_pem.count(b"BEGIN CERTIFICATE") == 2  # the leaf and Consul's intermediate
    assert web_id.roots_pem.count(b"BEGIN CERTIFICATE") == 1
    assert signed_by_roots(web_id.chain_pem, web_id.roots_pem)
    described = json.dumps(web.describe())
    assert "PRIVATE" not in described and web.describe()["trust_domain"] == domain
    assert "PRIVATE" not in repr(web_id) and "PRIVATE" not in repr(web)
    client_saw, server_saw = await handshake(
        contexts(db_id, tmp_path, True), contexts(web_id, tmp_path, False)
    )
    assert (client_saw, server_saw) == (db_id.spiffe_id.uri, web_id.spiffe_id.uri)
    # A second fetch(None) answers at once with the cached certificate.
    assert (await web.fetch(None)).serial == web_id.serial
    await web.close()
    await db.close()


async def test_fetch_current_blocks_until_the_leaf_is_renewed(consul_agent_factory):
    agent = consul_agent_factory(leaf_cert_ttl=2)
    registry = await open_registry(agent)
    source = ConsulIdentitySource(registry, "web")
    try:
        first = await source.fetch(None)
        started = time.monotonic()
        renewed = await asyncio.wait_for(source.fetch(first), 5)
        assert 1.0 <= time.monotonic() - started < 4.0  # renewal due at 1.2-1.8 s; slack for load
        assert renewed.serial != first.serial and renewed.roots_pem == first.roots_pem
        # A stale `current` gets the newer identity at once.
        assert (await asyncio.wait_for(source.fetch(first), 0.5)).serial == renewed.serial
    finally:
        await source.close()
        await registry.close()


async def test_root_rotation_releases_fetch_with_the_new_root_first(consul_agent, registry, tmp_path):
    source = ConsulIdentitySource(registry, "web")
    peer = ConsulIdentitySource(registry, "db")
    first, db_before = await source.fetch(None), await peer.fetch(None)
    waiting = asyncio.create_task(source.fetch(first))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await asyncio.to_thread(consul_agent.set_fault, "rotate_root")
    seen = [await asyncio.wait_for(waiting, 5)]
    while seen[-1].serial == first.serial:  # the roots may come first, then the leaf
        seen.append(await asyncio.wait_for(source.fetch(seen[-1]), 5))
    for identity in seen:
        assert identity.roots_pem.count(b"BEGIN CERTIFICATE") == 2  # old and new root
        assert signed_by_roots(identity.chain_pem, identity.roots_pem)
    rotated = seen[-1]
    assert rotated.chain_pem.count(b"BEGIN CERTIFICATE") == 3  # leaf, intermediate, cross-signed root
    # A peer that still trusts only the old root accepts the new leaf (cross-signing), and the
    # new leaf trusts the peer's leaf from the old root.
    server = contexts(rotated, tmp_path, True)
    client = contexts(db_before, tmp_path, False, roots_pem=first.roots_pem)
    assert await handshake(server, client) == (rotated.spiffe_id.uri, db_before.spiffe_id.uri)
    await source.close()
    await peer.close()


async def test_acl_refusal_is_identity_denied_without_the_token(consul_agent_acl):
    agent = consul_agent_acl
    agent.add_token(SECRET, {"service_write": ["other"]})
    registry = await open_registry(agent, token=SECRET)
    try:
        with pytest.raises(IdentityDenied) as denied:
            await ConsulIdentitySource(registry, "web").fetch(None)
        message = str(denied.value)
        assert "service:write on 'web'" in message and "403" in message and SECRET not in message
        agent.add_token("web-writer", {"service_write": ["web"]})
        allowed = await open_registry(agent, token="web-writer")
        assert (await ConsulIdentitySource(allowed, "web").fetch(None)).spiffe_id.service == "web"
        await allowed.close()
    finally:
        await registry.close()


async def test_unreachable_agent_is_identity_unavailable(consul_agent, registry):
    await asyncio.to_thread(consul_agent.set_fault, "refuse")
    with pytest.raises(IdentityUnavailable, match="unreachable"):
        await ConsulIdentitySource(registry, "web").fetch(None)


# -- intentions ------------------------------------------------------------------------------------


async def loaded(agent: BackgroundAgent, service: str, token: str | None = None) -> ConsulIntentions:
    registry = await open_registry(agent, token=token)
    intentions = ConsulIntentions(registry, service, retry_cap=0.3)
    await intentions.open()
    intentions._test_registry = registry  # type: ignore[attr-defined]
    return intentions


async def shut(intentions: ConsulIntentions) -> None:
    await intentions.close()
    await intentions._test_registry.close()  # type: ignore[attr-defined]


async def eventually(predicate: Any, timeout: float) -> float:
    """Seconds until predicate() is true; fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "not within the time allowed"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_intentions_precedence_and_changes_apply_quickly(consul_agent):
    agent = consul_agent
    put_intention(agent, "web", "db", "allow")
    put_intention(agent, "*", "db", "deny")
    put_intention(agent, "api", "*", "allow")  # an exact destination beats a wildcard one
    domain = trust_domain(agent)
    caller = {name: SpiffeId(domain, name, datacenter="dc1") for name in ("web", "api", "batch")}
    intentions = await loaded(agent, "db")
    try:
        assert await intentions.wait_loaded(2)
        assert intentions.decide(caller["web"]).allowed
        api = intentions.decide(caller["api"])
        assert not api.allowed and "* => db (deny" in api.reason
        assert not intentions.decide(caller["batch"]).allowed
        described = intentions.describe()
        assert (
            described["intentions"] == 3 and described["default"] == "allow" and not described["fail_static"]
        )
        assert described["default_source"] == "acls disabled" and described["age_seconds"] < 2

        put_intention(agent, "web", "db", "deny")
        assert await eventually(lambda: not intentions.decide(caller["web"]).allowed, 2.0) < 2.0
        http(agent, "DELETE", "/v1/connect/intentions/exact?source=*&destination=db")
        assert await eventually(lambda: intentions.decide(caller["api"]).allowed, 2.0) < 2.0
        assert "api => * (allow" in intentions.decide(caller["api"]).reason
        http(agent, "DELETE", "/v1/connect/intentions/exact?source=api&destination=*")
        await eventually(lambda: intentions.describe()["intentions"] == 1, 2.0)
        unmatched = intentions.decide(caller["batch"])  # no intention: ACLs off, so allow
        assert unmatched.allowed and "default is allow" in unmatched.reason
    finally:
        await shut(intentions)


async def test_fail_static_keeps_the_last_intentions(consul_agent):
    agent = consul_agent
    put_intention(agent, "web", "db", "allow")
    put_intention(agent, "*", "db", "deny")
    caller = SpiffeId(trust_domain(agent), "web", datacenter="dc1")
    stranger = SpiffeId(trust_domain(agent), "batch", datacenter="dc1")
    intentions = await loaded(agent, "db")
    try:
        assert await intentions.wait_loaded(2)
        await asyncio.to_thread(agent.set_fault, "refuse")
        await eventually(lambda: intentions.describe()["fail_static"], 3.0)
        assert intentions.decide(caller).allowed and not intentions.decide(stranger).allowed
        assert "unreachable" in (intentions.describe()["last_error"] or "")
        await asyncio.to_thread(agent.set_fault, "none")
        await eventually(lambda: not intentions.describe()["fail_static"], 3.0)
        assert intentions.describe()["intentions"] == 2
    finally:
        await shut(intentions)


async def test_never_loaded_denies_or_uses_a_known_default(consul_agent_factory):
    # Unreachable from the start: nothing is known, so every caller is denied, saying why.
    down = consul_agent_factory()
    await asyncio.to_thread(down.set_fault, "refuse")
    intentions = await loaded(down, "db")
    try:
        await eventually(lambda: intentions.describe()["fail_static"], 2.0)
        decision = intentions.decide(SpiffeId("x.consul", "web"))
        assert not decision.allowed and "not loaded yet" in decision.reason
    finally:
        await shut(intentions)

    # The agent's config is readable but the match is refused: the default decides meanwhile.
    agent = consul_agent_factory(acl_token="root-token", default_intention_policy="allow")
    agent.add_token("agent-reader", {"agent_read": True})
    intentions = await loaded(agent, "db", token="agent-reader")
    try:
        await eventually(lambda: intentions.describe()["default"] is not None, 2.0)
        await eventually(lambda: intentions.describe()["fail_static"], 2.0)
        decision = intentions.decide(SpiffeId("x.consul", "web"))
        assert decision.allowed and "not loaded yet" in decision.reason
        assert intentions.describe()["default_source"] == "default_intention_policy"
        assert "root-token" not in json.dumps(intentions.describe())
    finally:
        await shut(intentions)


async def test_default_policy_from_the_agent_or_the_acl_header(consul_agent_factory):
    deny = consul_agent_factory(default_intention_policy="deny")
    intentions = await loaded(deny, "db")
    try:
        assert await intentions.wait_loaded(2)
        decision = intentions.decide(SpiffeId(trust_domain(deny), "web", datacenter="dc1"))
        assert not decision.allowed and "default is deny" in decision.reason
        assert intentions.describe()["default_source"] == "default_intention_policy"
    finally:
        await shut(intentions)

    # ACLs on and a sidecar token without agent:read: the ACL default policy from the header.
    acl = consul_agent_factory(acl_token="root-token")
    acl.add_token("db-sidecar", {"service_write": ["db"]})
    put_intention(acl, "web", "db", "allow")
    intentions = await loaded(acl, "db", token="db-sidecar")
    try:
        assert await intentions.wait_loaded(2)
        domain = trust_domain(acl)
        assert intentions.decide(SpiffeId(domain, "web", datacenter="dc1")).allowed
        assert not intentions.decide(SpiffeId(domain, "batch", datacenter="dc1")).allowed
        assert intentions.describe()["default"] == "deny"
        assert intentions.describe()["default_source"] == "X-Consul-Default-ACL-Policy"
    finally:
        await shut(intentions)
