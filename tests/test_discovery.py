"""Discovery watchers against the real local registry file (limits, idle clean-up, the panic
rule) and against an in-memory registry (fail static, first answers, identity)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from sidecar.discovery import Discovery
from sidecar.errors import (
    DiscoveryLimit,
    NoHealthyInstance,
    RegistryUnavailableError,
    SidecarError,
    UnknownService,
)
from sidecar.registry.base import (
    CheckSpec,
    Instance,
    QueryResult,
    Registry,
    RegistryUnavailable,
    Status,
)
from sidecar.registry.consul import ConsulRegistry
from sidecar.registry.consul_settings import ConsulSettings
from sidecar.registry.local import LocalRegistry


async def test_watchers_are_bounded_and_unknown_names_are_forgotten(registry_path):
    registry = LocalRegistry(registry_path)
    await registry.register(
        Instance(id="real-1", name="real", address="127.0.0.1", port=1), CheckSpec(60, 60), "passing", "ok"
    )
    discovery = Discovery(registry, wait=0.1, unknown_idle_after=0.3, max_watches=3)
    try:
        assert [i.id for i in await discovery.resolve("real")] == ["real-1"]
        for name in ("nope-1", "nope-2"):
            with pytest.raises(UnknownService):
                await discovery.resolve(name)
        with pytest.raises(DiscoveryLimit):
            await discovery.resolve("nope-3")  # a fourth name while three are watched
        await asyncio.sleep(0.8)  # unknown names go idle after 0.3 s; the known one stays
        assert sorted(discovery.watches) == ["real"]
        with pytest.raises(UnknownService):
            await discovery.resolve("nope-3")  # room again
    finally:
        await discovery.close()
        await registry.close()


# -- the panic rule --------------------------------------------------------------------------


def svc(n: int) -> Instance:
    return Instance(id=f"svc-{n}", name="svc", address="127.0.0.1", port=9000 + n)


async def eventually(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate` (a SidecarError counts as not yet) with a generous bound."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except SidecarError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def ids(instances: tuple[Instance, ...]) -> list[str]:
    return sorted(i.id for i in instances)


def panic_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.discovery"]
    entered = [m for m in messages if "panic: routing to all" in m]
    left = [m for m in messages if "leaving panic" in m]
    return entered, left


async def test_no_passing_instance_routes_to_the_critical_ones_until_one_passes(registry_path, caplog):
    caplog.set_level(logging.INFO, logger="sidecar.discovery")
    registry = LocalRegistry(registry_path, poll_interval=0.05)
    writer = LocalRegistry(registry_path)
    long = CheckSpec(ttl=60, deregister_after=60)
    await writer.register(svc(1), long, "passing", "ok")
    await writer.register(svc(2), long, "passing", "ok")
    discovery = Discovery(registry, wait=0.5)
    try:
        assert ids(await discovery.resolve("svc")) == ["svc-1", "svc-2"]
        assert not discovery.panic("svc")

        # A health blip on every instance: both critical, both still heartbeating.
        await writer.report("svc-1", "critical", "GET /health 503")
        await writer.report("svc-2", "critical", "GET /health 503")
        await eventually(lambda: discovery.panic("svc"), what="panic")
        routed = await discovery.resolve("svc")
        assert ids(routed) == ["svc-1", "svc-2"]
        assert discovery.current("svc") is routed  # the same tuple, without waiting
        described = discovery.describe()["svc"]
        assert isinstance(described, dict)
        assert described["panic"] is True and described["instances"] == []
        assert sorted(i["id"] for i in described["critical"]) == ["svc-1", "svc-2"]
        entered, left = panic_lines(caplog)
        assert len(entered) == 1 and not left, (entered, left)
        assert "'svc'" in entered[0] and "2 registered instance(s)" in entered[0]

        # One passes again: only it gets traffic, and panic ends.
        await writer.report("svc-2", "passing", "ok")
        await eventually(lambda: not discovery.panic("svc"), what="leaving panic")
        assert ids(await discovery.resolve("svc")) == ["svc-2"]
        assert ids(discovery.current("svc")) == ["svc-2"]
        described = discovery.describe()["svc"]
        assert isinstance(described, dict)
        assert described["panic"] is False and [i["id"] for i in described["critical"]] == ["svc-1"]
        entered, left = panic_lines(caplog)
        assert len(entered) == 1 and len(left) == 1, (entered, left)
        assert "1 instance(s) passing again" in left[0]

        # The other one recovering changes nothing about panic (and logs no panic line).
        await writer.report("svc-1", "passing", "ok")
        await eventually(lambda: ids(discovery.current("svc")) == ["svc-1", "svc-2"], what="both passing")
        assert panic_lines(caplog) == (entered, left)
    finally:
        await discovery.close()
        await registry.close()
        await writer.close()


async def test_an_expired_heartbeat_leaves_the_panic_set_and_then_503(registry_path):
    registry = LocalRegistry(registry_path, poll_interval=0.05)
    writer = LocalRegistry(registry_path)
    await writer.register(svc(1), CheckSpec(ttl=0.5, deregister_after=60), "critical", "starting")
    await writer.register(svc(2), CheckSpec(ttl=60, deregister_after=60), "critical", "starting")
    discovery = Discovery(registry, wait=0.5)
    try:
        first = await discovery.resolve("svc")
        assert ids(first) in (["svc-1", "svc-2"], ["svc-2"])  # svc-1 may expire early on a slow machine
        assert discovery.panic("svc")
        # svc-1 stops heartbeating (a crashed sidecar): gone after its TTL, even in panic.
        await eventually(lambda: ids(discovery.current("svc")) == ["svc-2"], what="svc-1 expired")
        assert discovery.panic("svc")
        await writer.deregister("svc-2")
        await eventually(lambda: not discovery.panic("svc"), what="no critical instance left")
        # Nothing live is left: a 503 (the name stays known while watched), from both calls.
        with pytest.raises(NoHealthyInstance):
            await discovery.resolve("svc")
        with pytest.raises(NoHealthyInstance):
            discovery.current("svc")
    finally:
        await discovery.close()
        await registry.close()
        await writer.close()


class MemoryRegistry(Registry):
    """A registry whose answers the test sets; queries block (poll) until the answer changes."""

    kind = "memory"

    def __init__(self) -> None:
        self.answer = QueryResult(index=1, known=False, instances=())
        self.error: Exception | None = None
        self.queries = 0

    def set(
        self, instances: tuple[Instance, ...] = (), critical: tuple[Instance, ...] = (), known: bool = True
    ) -> None:
        self.answer = QueryResult(self.answer.index + 1, known, instances, critical)

    async def register(self, instance: Instance, check: CheckSpec, status: Status, note: str) -> None:
        raise NotImplementedError

    async def report(self, instance_id: str, status: Status, note: str) -> None:
        raise NotImplementedError

    async def deregister(self, instance_id: str) -> None:
        raise NotImplementedError

    async def query(self, name: str, index: int, wait: float) -> QueryResult:
        self.queries += 1
        deadline = time.monotonic() + wait
        while True:
            if self.error is not None:
                raise self.error
            if index == 0 or index != self.answer.index or time.monotonic() >= deadline:
                return self.answer
            await asyncio.sleep(0.01)


async def test_current_and_panic_for_names_without_an_answer():
    registry = MemoryRegistry()
    discovery = Discovery(registry, wait=0.2, first_answer_timeout=0.3)
    try:
        with pytest.raises(NoHealthyInstance):
            discovery.current("never-asked")  # no watch: nothing to hand out
        assert discovery.panic("never-asked") is False
        with pytest.raises(UnknownService):
            await discovery.resolve("nope")
        with pytest.raises(UnknownService):
            discovery.current("nope")
        assert discovery.panic("nope") is False

        registry.error = RegistryUnavailable("memory registry down")
        with pytest.raises(RegistryUnavailableError, match="memory registry down"):
            await discovery.resolve("down")  # never answered
        with pytest.raises(RegistryUnavailableError, match="memory registry down"):
            discovery.current("down")
    finally:
        await discovery.close()


async def test_panic_fails_static_and_keeps_the_tuple_while_nothing_changes(caplog):
    caplog.set_level(logging.INFO, logger="sidecar.discovery")
    registry = MemoryRegistry()
    registry.set(critical=(svc(1), svc(2)))
    discovery = Discovery(registry, wait=0.2)
    try:
        routed = await discovery.resolve("svc")
        assert ids(routed) == ["svc-1", "svc-2"] and discovery.panic("svc")

        # A new index with the same sets: the same tuple object (the balancer compares by identity).
        index = discovery.watches["svc"].index
        registry.set(critical=(svc(1), svc(2)))
        await eventually(lambda: discovery.watches["svc"].index > index, what="the new index")
        assert discovery.current("svc") is routed

        # The registry fails: the last known (critical) set stays in use, still in panic.
        registry.error = RegistryUnavailable("memory registry down")
        queries = registry.queries
        await eventually(lambda: registry.queries > queries + 1, what="failing queries")
        await eventually(lambda: discovery.watches["svc"].error is not None, what="the error noted")
        assert discovery.current("svc") is routed and discovery.panic("svc")
        described = discovery.describe()["svc"]
        assert isinstance(described, dict) and described["stale"] is True and described["panic"] is True

        # It comes back with one passing instance: only that one, and panic ends.
        registry.error = None
        registry.set(instances=(svc(2),), critical=(svc(1),))
        await eventually(lambda: not discovery.panic("svc"), what="leaving panic")
        assert ids(discovery.current("svc")) == ["svc-2"]

        # Back into panic, then everything deregistered: panic ends, 503.
        registry.set(critical=(svc(1), svc(2)))
        await eventually(lambda: discovery.panic("svc"), what="panic again")
        registry.set(known=False)
        await eventually(lambda: not discovery.panic("svc"), what="no instance left")
        with pytest.raises(NoHealthyInstance):
            discovery.current("svc")
        entered, left = panic_lines(caplog)
        assert len(entered) == 2 and len(left) == 2, (entered, left)
        assert "no live instance left" in left[1]
    finally:
        await discovery.close()


async def test_panic_on_consul_with_blocking_queries(consul_agent):
    registry = ConsulRegistry(ConsulSettings(consul_agent.addr), timeout=5.0)
    long = CheckSpec(ttl=60, deregister_after=60)
    await registry.register(svc(1), long, "passing", "ok")
    await registry.register(svc(2), long, "passing", "ok")
    discovery = Discovery(registry, wait=5.0)  # blocking queries that wake on changes
    try:
        assert ids(await discovery.resolve("svc")) == ["svc-1", "svc-2"]
        await registry.report("svc-1", "critical", "GET /health 503")
        await registry.report("svc-2", "warning", "slow")  # warning is not passing either
        await eventually(lambda: discovery.panic("svc"), what="panic")
        assert ids(discovery.current("svc")) == ["svc-1", "svc-2"]
        await registry.report("svc-1", "passing", "ok")
        await eventually(lambda: not discovery.panic("svc"), what="leaving panic")
        assert ids(discovery.current("svc")) == ["svc-1"]
    finally:
        await discovery.close()
        await registry.close()
