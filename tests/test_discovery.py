"""Discovery watchers against the real local registry file: limits and idle clean-up."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.discovery import Discovery
from sidecar.errors import DiscoveryLimit, UnknownService
from sidecar.registry.base import CheckSpec, Instance
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
