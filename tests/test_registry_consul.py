"""The Consul registry backend: settings from flags and env, and real HTTP against the test agent."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import aiohttp
import pytest
from aiohttp import web as web_

from sidecar.registry.base import (
    CheckSpec,
    Instance,
    RegistrationLost,
    RegistryDenied,
    RegistryUnavailable,
)
from sidecar.registry.consul import ConsulRegistry
from sidecar.registry.consul_settings import ConsulSettings

SENTINEL = "s3cr3t-sentinel-5f0c1d2e"

# -- settings ------------------------------------------------------------------------------


def test_defaults_without_flags_or_env():
    s = ConsulSettings.from_sources({}, {})
    assert s.url == "http://127.0.0.1:8500"
    assert s.token is None and s.verify and not s.tls and s.datacenter is None


def test_env_follows_consul_conventions(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {SENTINEL}\n")
    s = ConsulSettings.from_sources(
        {},
        {
            "CONSUL_HTTP_ADDR": "consul.local:8501",
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_HTTP_SSL_VERIFY": "false",
            "CONSUL_HTTP_TOKEN": "ignored-because-the-file-wins",
            "CONSUL_HTTP_TOKEN_FILE": str(token_file),
        },
    )
    assert s.url == "https://consul.local:8501"
    assert s.token == SENTINEL
    assert s.verify is False


def test_flags_win_over_env():
    s = ConsulSettings.from_sources(
        {"consul_addr": "http://10.0.0.1:9500", "consul_token": "flag-token", "datacenter": "dc2"},
        {"CONSUL_HTTP_ADDR": "127.0.0.1:1", "CONSUL_HTTP_TOKEN": "env-token", "CONSUL_HTTP_SSL": "true"},
    )
    assert s.url == "http://10.0.0.1:9500"  # an explicit scheme beats CONSUL_HTTP_SSL
    assert s.token == "flag-token"
    assert s.datacenter == "dc2"


def test_addr_forms():
    assert ConsulSettings("https://consul.local").url == "https://consul.local:443"
    assert ConsulSettings("[::1]:8500").hostport == "[::1]:8500"
    assert ConsulSettings.from_sources({"consul_addr": "127.0.0.1:8600"}, {"CONSUL_HTTP_SSL": "1"}).tls


@pytest.mark.parametrize(
    ("flags", "env", "names"),
    [
        ({"consul_addr": "127.0.0.1:99999"}, {}, "--consul-addr"),
        ({"consul_addr": "127.0.0.1:port"}, {}, "--consul-addr"),
        ({}, {"CONSUL_HTTP_ADDR": "ftp://x:1"}, "CONSUL_HTTP_ADDR"),
        ({"consul_ssl_verify": "maybe"}, {}, "--consul-ssl-verify"),
        ({}, {"CONSUL_HTTP_SSL": "yes please"}, "CONSUL_HTTP_SSL"),
        ({"consul_token_file": "/nonexistent/token"}, {}, "--consul-token-file"),
        ({}, {"CONSUL_HTTP_TOKEN_FILE": "/nonexistent/token"}, "CONSUL_HTTP_TOKEN_FILE"),
        ({"consul_cacert": "/nonexistent/ca.pem"}, {}, "--consul-cacert"),
        ({"consul_token": f"{SENTINEL} x"}, {}, "--consul-token"),
        ({"consul_token": SENTINEL, "consul_token_file": "/x"}, {}, "--consul-token"),
    ],
)
def test_bad_input_names_the_source_and_never_the_token(flags, env, names):
    with pytest.raises(ValueError) as info:
        ConsulSettings.from_sources(flags, env)
    assert str(info.value).startswith(names + ":"), str(info.value)
    assert SENTINEL not in str(info.value)


def test_empty_token_file_is_an_error(tmp_path):
    (tmp_path / "t").write_text("\n")
    with pytest.raises(ValueError, match=r"^--consul-token-file: .* is empty"):
        ConsulSettings.from_sources({"consul_token_file": str(tmp_path / "t")}, {})


def test_repr_hides_the_token():
    s = ConsulSettings(token=SENTINEL)
    assert SENTINEL not in repr(s) and SENTINEL not in str(s)
    assert "token=<set>" in repr(s)


# -- against the Consul test agent over real HTTP ------------------------------------------

CHECK = CheckSpec(ttl=15.0, deregister_after=60.0)


def web(n: int = 1, address: str = "127.0.0.1", name: str = "web") -> Instance:
    return Instance(f"{name}-{n}", name, address, 9000 + n, ("v1", "blue"), {"version": "1.2.3"})


@pytest.fixture
async def registry(consul_agent):
    reg = ConsulRegistry(ConsulSettings(consul_agent.addr), timeout=2.0)
    await reg.open()
    yield reg
    await reg.close()


async def test_register_shape_in_agent_and_health(consul_agent, registry):
    await registry.register(web(1), CheckSpec(ttl=1.5, deregister_after=90), "passing", "probe ok")

    svc = consul_agent.services()["web-1"]
    assert (svc["ID"], svc["Service"], svc["Address"], svc["Port"]) == ("web-1", "web", "127.0.0.1", 9001)
    assert svc["Tags"] == ["v1", "blue"] and svc["Meta"] == {"version": "1.2.3"}

    check = consul_agent.checks()["service:web-1"]
    assert (check["Type"], check["ServiceID"], check["Status"], check["Output"]) == (
        "ttl",
        "web-1",
        "passing",
        "probe ok",
    )
    assert check["Definition"]["TTL"] == "1.5s"
    assert check["Definition"]["DeregisterCriticalServiceAfter"] == "1m30s"

    (entry,) = consul_agent.health("web", passing=True)
    assert entry["Service"]["ID"] == "web-1"
    assert "service:web-1" in {c["CheckID"] for c in entry["Checks"]}


async def test_register_critical_is_not_passing(consul_agent, registry):
    await registry.register(web(1), CHECK, "critical", "starting")
    assert consul_agent.checks()["service:web-1"]["Status"] == "critical"
    assert consul_agent.health("web", passing=True) == []


async def test_report_is_visible_in_health_with_the_note(consul_agent, registry):
    await registry.register(web(1), CHECK, "critical", "starting")
    await registry.report("web-1", "passing", "GET /health 200")
    (entry,) = consul_agent.health("web", passing=True)
    (check,) = [c for c in entry["Checks"] if c["CheckID"] == "service:web-1"]
    assert check["Output"] == "GET /health 200"

    await registry.report("web-1", "critical", "GET /health 503")
    assert consul_agent.health("web", passing=True) == []
    assert consul_agent.checks()["service:web-1"]["Output"] == "GET /health 503"

    await registry.report("web-1", "warning", "slow")
    assert consul_agent.checks()["service:web-1"]["Status"] == "warning"


async def test_report_after_wipe_is_registration_lost(consul_agent, registry):
    await registry.register(web(1), CHECK, "passing", "ok")
    consul_agent.wipe()
    with pytest.raises(RegistrationLost, match=r"service:web-1"):
        await registry.report("web-1", "passing", "ok")
    await registry.register(web(1), CHECK, "passing", "ok")  # and registering again works
    await registry.report("web-1", "passing", "ok")


async def test_deregister_removes_and_tolerates_unknown(consul_agent, registry):
    await registry.register(web(1), CHECK, "passing", "ok")
    await registry.deregister("web-1")
    assert "web-1" not in consul_agent.services()
    assert "service:web-1" not in consul_agent.checks()
    await registry.deregister("web-1")
    await registry.deregister("never-was")


async def test_query_known_unknown_and_no_healthy(registry):
    unknown = await registry.query("nope", 0, 1.0)
    assert (unknown.known, unknown.instances) == (False, ())
    assert unknown.index > 0

    await registry.register(web(1), CHECK, "critical", "starting")
    sick = await registry.query("web", 0, 1.0)
    assert (sick.known, sick.instances) == (True, ())

    await registry.register(web(2, address=""), CHECK, "passing", "ok")
    healthy = await registry.query("web", 0, 1.0)
    (inst,) = healthy.instances
    # An empty Service.Address falls back to the node's address.
    assert inst == Instance("web-2", "web", "127.0.0.1", 9002, ("v1", "blue"), {"version": "1.2.3"})


async def test_blocking_query_wakes_soon_after_a_change(registry):
    await registry.register(web(1), CHECK, "critical", "starting")
    first = await registry.query("web", 0, 1.0)

    task = asyncio.create_task(registry.query("web", first.index, 10.0))
    await asyncio.sleep(0.3)
    assert not task.done()  # it blocks while nothing changes
    changed_at = time.monotonic()
    await registry.report("web-1", "passing", "ok")
    result = await asyncio.wait_for(task, 5.0)
    latency = time.monotonic() - changed_at
    print(f"blocking query returned {latency * 1000:.0f} ms after the change")
    assert latency < 1.0
    assert result.index > first.index and [i.id for i in result.instances] == ["web-1"]


async def test_blocking_query_returns_the_same_index_when_wait_runs_out(registry):
    await registry.register(web(1), CHECK, "passing", "ok")
    first = await registry.query("web", 0, 1.0)
    started = time.monotonic()
    again = await registry.query("web", first.index, 0.3)
    assert 0.25 < time.monotonic() - started < 1.5
    assert again.index == first.index and again.instances == first.instances


async def test_index_going_backwards_is_returned_as_is(consul_agent, registry):
    await registry.register(web(1), CHECK, "passing", "ok")
    first = await registry.query("web", 0, 1.0)
    task = asyncio.create_task(registry.query("web", first.index, 10.0))
    await asyncio.sleep(0.2)
    consul_agent.reset_index()
    result = await asyncio.wait_for(task, 5.0)
    assert 0 < result.index < first.index  # the caller restarts from 0
    assert [i.id for i in result.instances] == ["web-1"]


@pytest.mark.parametrize(
    ("fault", "expect"),
    [("refuse", "unreachable"), ("error500", "answered 500"), ("hang", "did not answer")],
)
async def test_faults_become_registry_unavailable_quickly(consul_agent, fault, expect):
    registry = ConsulRegistry(ConsulSettings(consul_agent.addr), timeout=0.3)
    await registry.register(web(1), CHECK, "passing", "ok")
    consul_agent.set_fault(fault)
    calls = [
        registry.register(web(1), CHECK, "passing", "ok"),
        registry.report("web-1", "passing", "ok"),
        registry.deregister("web-1"),
        registry.query("web", 0, 1.0),
        registry.query("web", 1, 0.2),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as info:
            await call
        elapsed = time.monotonic() - started
        message = str(info.value)
        assert expect in message and consul_agent.addr in message, message
        assert elapsed < 2.0, f"{message} took {elapsed:.1f}s"
    consul_agent.set_fault("none")
    await registry.report("web-1", "passing", "back")
    await registry.close()


# -- ACLs ------------------------------------------------------------------------------------


async def test_acl_token_is_sent_and_accepted(consul_agent_acl):
    reg = ConsulRegistry(ConsulSettings(consul_agent_acl.addr, token=consul_agent_acl.token))
    try:
        await reg.register(web(1), CHECK, "passing", "ok")
        await reg.report("web-1", "passing", "ok")
        assert [i.id for i in (await reg.query("web", 0, 1.0)).instances] == ["web-1"]
        await reg.deregister("web-1")
    finally:
        await reg.close()


async def test_acl_denials_name_the_missing_permission(consul_agent_acl):
    limited = "limited-" + SENTINEL
    policy = {"service_write": ["web"], "service_read": ["web"], "node_read": True}
    consul_agent_acl.add_token(limited, policy)
    reg = ConsulRegistry(ConsulSettings(consul_agent_acl.addr, token=limited))
    anon = ConsulRegistry(ConsulSettings(consul_agent_acl.addr))
    stranger = ConsulRegistry(ConsulSettings(consul_agent_acl.addr, token="not-a-known-token"))
    admin = ConsulRegistry(ConsulSettings(consul_agent_acl.addr, token=consul_agent_acl.token))
    try:
        await reg.register(web(1), CHECK, "passing", "ok")  # allowed
        with pytest.raises(RegistryDenied) as info:
            await reg.register(web(1, name="db"), CHECK, "passing", "ok")
        assert str(info.value).startswith(f"consul at {consul_agent_acl.addr} denied registering 'db' (db-1)")
        assert "the ACL token lacks service:write on 'db'" in str(info.value)

        # Consul hides what a token may not read (X-Consul-Results-Filtered-By-ACLs)...
        await admin.register(web(1, name="db"), CHECK, "passing", "ok")
        hidden = r"hid the instances of 'db': the ACL token lacks service:read"
        with pytest.raises(RegistryDenied, match=hidden):
            await reg.query("db", 0, 1.0)
        # ...while a name that does not exist is just unknown.
        assert (await reg.query("nope", 0, 1.0)).known is False

        with pytest.raises(RegistryDenied, match=r"denied updating check service:web-1: no ACL token is set"):
            await anon.report("web-1", "passing", "ok")
        with pytest.raises(RegistryDenied, match=r"the ACL token is not known to consul"):
            await stranger.report("web-1", "passing", "ok")
    finally:
        for r in (reg, anon, stranger, admin):
            await r.close()


async def test_the_token_never_leaks(consul_agent_factory, caplog, monkeypatch):
    """Logs at DEBUG, every error message (with its causes), repr and describe stay token-free,
    and on the wire the token is only in the X-Consul-Token header."""
    caplog.set_level(logging.DEBUG)
    agent = consul_agent_factory(acl_token="mgmt-" + uuid.uuid4().hex)
    agent.add_token(SENTINEL, {"service_write": ["web"]})
    reg = ConsulRegistry(ConsulSettings(agent.addr, token=SENTINEL), timeout=0.5)
    texts = [repr(reg), json.dumps(reg.describe()), repr(reg._settings)]

    async def collect(call):
        try:
            await call
        except Exception as exc:
            while exc is not None:
                texts.append(f"{type(exc).__name__}: {exc}")
                exc = exc.__cause__ or exc.__context__

    await collect(reg.register(web(1), CHECK, "passing", "ok"))
    await collect(reg.register(web(1, name="db"), CHECK, "passing", "ok"))
    await collect(reg.query("web", 0, 1.0))
    await collect(reg.report("gone-1", "passing", "ok"))
    for fault in ("error500", "hang", "refuse"):
        agent.set_fault(fault)
        await collect(reg.report("web-1", "passing", "ok"))
        await collect(reg.query("web", 5, 0.2))
    agent.set_fault("none")
    await reg.close()
    assert len(texts) > 8
    texts.append(caplog.text)
    for text in texts:
        assert SENTINEL not in text, text

    # On the wire: a recording server sees the token in the header and nowhere else.
    seen = []

    async def record(request: web_.Request) -> web_.Response:
        seen.append((str(request.url), dict(request.headers), await request.text()))
        return web_.json_response([], headers={"X-Consul-Index": "7"})

    server = web_.Server(record)
    runner = web_.ServerRunner(server)
    await runner.setup()
    site = web_.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token-must-not-win")
    wire = ConsulRegistry(ConsulSettings(f"127.0.0.1:{port}", token=SENTINEL))
    try:
        await wire.register(web(1), CHECK, "passing", "ok")
        await wire.report("web-1", "passing", "ok")
        await wire.query("web", 0, 1.0)
        await wire.deregister("web-1")
    finally:
        await wire.close()
        await runner.cleanup()
    assert len(seen) >= 5
    for url, headers, body in seen:
        assert headers.get("X-Consul-Token") == SENTINEL
        assert SENTINEL not in url and SENTINEL not in body
        assert "token=" not in url


# -- passing and critical instances (the panic rule's input) --------------------------------


async def agent_put(agent, path: str, body: object = None) -> None:
    async with aiohttp.ClientSession() as session:
        data = None if body is None else json.dumps(body)
        async with session.put(f"{agent.url}{path}", data=data) as resp:
            assert resp.status == 200, (path, resp.status, await resp.text())


async def test_query_classifies_every_listed_instance_by_all_its_checks(consul_agent, registry):
    await registry.register(web(1), CHECK, "passing", "ok")
    await registry.register(web(2), CHECK, "critical", "GET /health 503")
    await registry.register(web(3), CHECK, "warning", "slow")
    await registry.register(web(4), CHECK, "passing", "ok")
    # A second check on web-4, failing: one failing check is enough to be critical.
    await agent_put(
        consul_agent,
        "/v1/agent/check/register",
        {"Name": "extra", "CheckID": "extra:web-4", "ServiceID": "web-4", "TTL": "30s", "Status": "critical"},
    )
    result = await registry.query("web", 0, 1.0)
    assert result.known
    assert [i.id for i in result.instances] == ["web-1"]
    assert sorted(i.id for i in result.critical) == ["web-2", "web-3", "web-4"]
    # What Consul's own ?passing filter keeps is exactly our passing set.
    assert [e["Service"]["ID"] for e in consul_agent.health("web", passing=True)] == ["web-1"]

    # The node's checks count too: node maintenance makes every instance on it critical.
    await agent_put(consul_agent, "/v1/agent/maintenance?enable=true&reason=test")
    on_maintenance = await registry.query("web", 0, 1.0)
    assert on_maintenance.known and on_maintenance.instances == ()
    assert sorted(i.id for i in on_maintenance.critical) == ["web-1", "web-2", "web-3", "web-4"]


async def test_only_critical_instances_is_known_and_keeps_the_cached_instances(registry):
    await registry.register(web(1), CHECK, "passing", "ok")
    await registry.register(web(2), CHECK, "passing", "ok")
    healthy = await registry.query("web", 0, 1.0)
    assert [i.id for i in healthy.instances] == ["web-1", "web-2"] and healthy.critical == ()

    blocked = asyncio.create_task(registry.query("web", healthy.index, 10.0))
    await asyncio.sleep(0.2)
    assert not blocked.done()
    await registry.report("web-1", "critical", "GET /health 503")  # a check change wakes it
    one_down = await asyncio.wait_for(blocked, 5.0)
    assert one_down.index > healthy.index
    assert [i.id for i in one_down.instances] == ["web-2"]
    assert [i.id for i in one_down.critical] == ["web-1"]

    await registry.report("web-2", "critical", "GET /health 503")
    sick = await registry.query("web", 0, 1.0)
    assert sick.known and sick.instances == ()
    assert [i.id for i in sick.critical] == ["web-1", "web-2"]
    # A check's status does not change Service.ModifyIndex: the Instances are reused.
    assert sick.critical[0] is healthy.instances[0] and sick.critical[1] is healthy.instances[1]


async def test_critical_instance_is_live_until_consul_deregisters_it(consul_agent, registry):
    await registry.register(web(1), CheckSpec(ttl=15.0, deregister_after=0.5), "critical", "starting")
    first = await registry.query("web", 0, 1.0)
    assert first.known and [i.id for i in first.critical] == ["web-1"]
    # The agent reaps it after DeregisterCriticalServiceAfter: then it is gone, not critical.
    consul_agent.wait_for(lambda a: "web-1" not in a.services(), timeout=10.0)
    gone = await registry.query("web", 0, 1.0)
    assert (gone.known, gone.instances, gone.critical) == (False, (), ())


async def test_acl_hidden_critical_instances_are_still_denied(consul_agent_acl):
    limited = "limited-" + SENTINEL
    consul_agent_acl.add_token(limited, {"service_read": ["web"], "node_read": True})
    reg = ConsulRegistry(ConsulSettings(consul_agent_acl.addr, token=limited))
    admin = ConsulRegistry(ConsulSettings(consul_agent_acl.addr, token=consul_agent_acl.token))
    try:
        await admin.register(web(1, name="db"), CHECK, "critical", "starting")
        with pytest.raises(RegistryDenied, match=r"hid the instances of 'db'") as info:
            await reg.query("db", 0, 1.0)
        assert SENTINEL not in str(info.value)
        await admin.register(web(1), CHECK, "critical", "starting")
        readable = await reg.query("web", 0, 1.0)
        assert readable.known and [i.id for i in readable.critical] == ["web-1"]
    finally:
        await reg.close()
        await admin.close()


async def test_health_query_has_no_passing_filter_and_rejects_malformed_checks():
    """Against a recording server: the query asks for every instance, entries without checks
    pass (as with Consul's ?passing), and a check without a Status is a malformed answer."""
    seen: list[str] = []
    answers = [
        [
            {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "a", "Port": 1}, "Checks": None},
            {
                "Node": {"Address": "10.0.0.1"},
                "Service": {"ID": "b", "Port": 2},
                "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"Status": "warning"}],
            },
        ],
        [{"Node": {}, "Service": {"ID": "c", "Port": 3}, "Checks": [{"CheckID": "no-status"}]}],
    ]

    async def answer(request: web_.Request) -> web_.Response:
        seen.append(str(request.rel_url))
        return web_.json_response(answers[min(len(seen), len(answers)) - 1], headers={"X-Consul-Index": "7"})

    runner = web_.ServerRunner(web_.Server(answer))
    await runner.setup()
    site = web_.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    reg = ConsulRegistry(ConsulSettings(f"127.0.0.1:{runner.addresses[0][1]}"), timeout=2.0)
    try:
        result = await reg.query("web", 0, 1.0)
        assert [i.id for i in result.instances] == ["a"] and [i.id for i in result.critical] == ["b"]
        with pytest.raises(RegistryUnavailable, match="malformed entry"):
            await reg.query("web", 0, 1.0)
    finally:
        await reg.close()
        await runner.cleanup()
    assert seen and all(url.startswith("/v1/health/service/web") and "passing" not in url for url in seen)
