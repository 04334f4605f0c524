"""The embedded SQLite registry, with several processes writing to one file."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from sidecar.registry.base import CheckSpec, Instance, RegistrationLost
from sidecar.registry.local import LocalRegistry

CHECK = CheckSpec(ttl=0.5, deregister_after=0.5)
LONG = CheckSpec(ttl=30, deregister_after=60)


def inst(i: int, name: str = "svc") -> Instance:
    return Instance(
        id=f"{name}-{i}", name=name, address="127.0.0.1", port=1000 + i, tags=("t",), meta={"k": "v"}
    )


async def test_register_query_report_deregister(registry_path):
    reg = LocalRegistry(registry_path)
    await reg.open()
    try:
        unknown = await reg.query("svc", 0, 0)
        assert not unknown.known and unknown.instances == ()
        await reg.register(inst(1), CHECK, "critical", "starting")
        critical = await reg.query("svc", 0, 0)
        assert critical.known and critical.instances == ()
        await reg.report("svc-1", "passing", "ok")
        healthy = await reg.query("svc", 0, 0)
        assert healthy.instances == (inst(1),)
        assert healthy.index > critical.index
        await reg.deregister("svc-1")
        with_nothing = await reg.query("svc", 0, 0)
        assert with_nothing.instances == () and not with_nothing.known
        try:
            await reg.report("svc-1", "passing", "ok")
            raise AssertionError("expected RegistrationLost")
        except RegistrationLost:
            pass
    finally:
        await reg.close()


async def test_stale_heartbeat_is_ignored_then_cleaned(registry_path):
    reg = LocalRegistry(registry_path)
    await reg.register(inst(1), CHECK, "passing", "ok")
    assert (await reg.query("svc", 0, 0)).instances
    await asyncio.sleep(0.6)
    stale = await reg.query("svc", 0, 0)
    assert stale.instances == () and stale.known  # ignored, not yet cleaned
    await asyncio.sleep(0.5)
    assert not (await reg.query("svc", 0, 0)).known  # cleaned
    await reg.close()


async def test_blocking_query_notices_a_change_within_a_second(registry_path):
    reader, writer = LocalRegistry(registry_path), LocalRegistry(registry_path)
    first = await reader.query("svc", 0, 0)

    async def later():
        await asyncio.sleep(0.3)
        await writer.register(inst(2), CheckSpec(30, 30), "passing", "ok")

    task = asyncio.create_task(later())
    started = time.monotonic()
    result = await reader.query("svc", first.index, 5.0)
    elapsed = time.monotonic() - started
    await task
    assert result.instances == (inst(2),)
    assert elapsed < 1.0
    same = await reader.query("svc", result.index, 0.3)  # nothing changes: same index after the wait
    assert same.index == result.index
    await reader.close()
    await writer.close()


WRITER = """
import asyncio, sys
from sidecar.registry.base import CheckSpec, Instance
from sidecar.registry.local import LocalRegistry
async def main(path, n):
    reg = LocalRegistry(path)
    for i in range(40):
        inst = Instance(id=f"w{n}-{i}", name="busy", address="127.0.0.1", port=i + 1)
        await reg.register(inst, CheckSpec(60, 60), "passing", "ok")
        await reg.report(inst.id, "passing", "still ok")
    await reg.close()
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_several_processes_write_at_once(registry_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(registry_path), str(n)], stderr=subprocess.PIPE)
        for n in range(4)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reg = LocalRegistry(registry_path)
    result = await reg.query("busy", 0, 0)
    assert len(result.instances) == 160
    await reg.close()


async def test_critical_instances_are_reported_apart_from_passing_ones(registry_path):
    reg = LocalRegistry(registry_path)
    try:
        long = CheckSpec(ttl=60, deregister_after=60)
        await reg.register(inst(1), long, "passing", "ok")
        await reg.register(inst(2), long, "critical", "GET /health 503")
        await reg.register(inst(3), long, "warning", "slow")
        mixed = await reg.query("svc", 0, 0)
        assert mixed.known
        assert mixed.instances == (inst(1),)
        assert mixed.critical == (inst(2), inst(3))  # anything but passing is not passing

        await reg.report("svc-1", "critical", "GET /health 503")
        all_critical = await reg.query("svc", 0, 0)
        assert all_critical.known and all_critical.instances == ()
        assert all_critical.critical == (inst(1), inst(2), inst(3))
        assert all_critical.index > mixed.index

        # A note changes nothing that discovery sees: same index, and a blocking query waits.
        await reg.report("svc-2", "critical", "GET /health 500")
        same = await reg.query("svc", all_critical.index, 0.3)
        assert same.index == all_critical.index

        await reg.report("svc-2", "passing", "ok")
        one_back = await reg.query("svc", all_critical.index, 5.0)
        assert one_back.instances == (inst(2),) and one_back.critical == (inst(1), inst(3))
    finally:
        await reg.close()


async def test_a_critical_row_whose_heartbeat_expired_is_gone_not_critical(registry_path):
    reg = LocalRegistry(registry_path)
    try:
        await reg.register(inst(1), CheckSpec(ttl=0.5, deregister_after=60), "critical", "starting")
        await reg.register(inst(2), CheckSpec(ttl=60, deregister_after=60), "critical", "starting")
        fresh = await reg.query("svc", 0, 0)
        assert fresh.critical == (inst(1), inst(2))
        await asyncio.sleep(0.7)
        expired = await reg.query("svc", 0, 0)
        assert expired.known and expired.instances == () and expired.critical == (inst(2),)
        assert expired.index > fresh.index
        await reg.deregister("svc-2")
        only_stale = await reg.query("svc", 0, 0)
        assert only_stale.known and only_stale.instances == () and only_stale.critical == ()
    finally:
        await reg.close()


async def test_close_waits_for_a_write_whose_caller_was_cancelled(registry_path):
    """A cancelled caller leaves its worker thread running; close() must not shut the
    connection under that thread (closing it mid-statement crashed the process once)."""
    import sqlite3

    reg = LocalRegistry(registry_path)
    await reg.open()
    blocker = sqlite3.connect(registry_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the registry's next write waits on this lock
    released_at: list[float] = []

    def release() -> None:
        blocker.execute("COMMIT")
        released_at.append(time.monotonic())

    try:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(reg.register(inst(7), LONG, "passing", "ok"), 0.1)
            raise AssertionError("the write should have waited on the lock")
        except TimeoutError:
            pass
        loop.call_later(0.4, release)
        await reg.close()
        closed_at = time.monotonic()
        assert released_at and closed_at >= released_at[0]
    finally:
        if not released_at:
            blocker.execute("ROLLBACK")
        blocker.close()
    # the write its caller gave up on ran to the end, and the registry works afterwards
    again = LocalRegistry(registry_path)
    await again.open()
    try:
        assert (await again.query("svc", 0, 0)).instances == (inst(7),)
    finally:
        await again.close()
