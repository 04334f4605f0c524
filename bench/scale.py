"""How the sidecar's costs grow with the size of a service (issue 7's 10,000-instance targets).

    python bench/scale.py [--instances 10000] [--picks 20000]

Measures, in one process, side by side for a small and a large service:
- the CPU cost of one endpoint pick + release (P2C and round robin);
- applying a discovery update of the large service: the Consul answer (a JSON body of
  Consul-shaped health entries) parsed into instances, the watcher's change check, and
  the balancer's re-sync on the next pick; and the same through the local registry
  (a SQLite read of every row).
It is a benchmark, not a test: it reports numbers and the targets, it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from statistics import median

from sidecar.balancer import make_balancer
from sidecar.registry.base import CheckSpec, Instance
from sidecar.registry.consul import ConsulRegistry
from sidecar.registry.consul_settings import ConsulSettings
from sidecar.registry.local import LocalRegistry
from sidecar.runtime import tune_gc


def instances(n: int, base: int = 0) -> tuple[Instance, ...]:
    return tuple(
        Instance(
            id=f"svc-{base + i}",
            name="svc",
            address=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
            port=8000 + i % 1000,
        )
        for i in range(n)
    )


def pick_cost_us(kind: str, pool: tuple[Instance, ...], picks: int) -> float:
    b = make_balancer(kind, rng=random.Random(1))
    b.release(b.acquire("svc", pool), 200)  # first sync outside the timing
    runs = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(picks):
            b.release(b.acquire("svc", pool), 200)
        runs.append((time.process_time() - started) / picks * 1e6)
    return median(runs)


def consul_body(pool: tuple[Instance, ...]) -> str:
    return json.dumps(
        [
            {
                "Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1"},
                "Service": {
                    "ID": i.id,
                    "Service": i.name,
                    "Address": i.address,
                    "Port": i.port,
                    "Tags": ["v1"],
                    "Meta": {"app_port": "3000"},
                },
                "Checks": [
                    {"CheckID": "serfHealth", "Status": "passing"},
                    {"CheckID": f"service:{i.id}", "Status": "passing"},
                ],
            }
            for i in pool
        ]
    )


def consul_update_ms(pool: tuple[Instance, ...]) -> tuple[float, float]:
    """A Consul answer parsed into instances (as ConsulRegistry.query does), the change
    detected and the balancer re-synced on the next pick: first for a whole new set, then
    for the next answer in which one instance changed."""
    registry = ConsulRegistry(ConsulSettings())
    b = make_balancer("p2c")
    times = []
    previous: tuple[Instance, ...] = instances(len(pool), base=10**6)  # an older, different set
    b.release(b.acquire("svc", previous), 200)
    first = json.loads(consul_body(pool))
    second = json.loads(consul_body(pool))
    second[0]["Service"]["Port"] += 1
    for entries in (first, second):
        for n, entry in enumerate(entries):
            entry["Service"]["ModifyIndex"] = 100 + n
        second[0]["Service"]["ModifyIndex"] = 10**6
        body = json.dumps(entries)
        started = time.perf_counter()
        parsed = registry.healthy_instances("svc", body, "bench")  # as ConsulRegistry.query
        assert parsed != previous and len(parsed) == len(pool)
        b.release(b.acquire("svc", parsed), 200)
        times.append((time.perf_counter() - started) * 1000)
        previous = parsed
    return times[0], times[1]


async def local_update_ms(pool: tuple[Instance, ...]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        reg = LocalRegistry(Path(tmp) / "r.sqlite3")
        check = CheckSpec(ttl=600, deregister_after=600)
        for inst in pool:
            await reg.register(inst, check, "passing", "bench")
        b = make_balancer("p2c")
        started = time.perf_counter()
        result = await reg.query("svc", 0, 0)
        b.release(b.acquire("svc", result.instances), 200)
        elapsed = time.perf_counter() - started
        await reg.close()
        assert len(result.instances) == len(pool)
        return elapsed * 1000


def main() -> None:
    tune_gc()  # as the sidecar does at start-up
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--picks", type=int, default=20_000)
    parser.add_argument("--skip-local", action="store_true", help="skip the SQLite update (slow to fill)")
    args = parser.parse_args()
    small, large = instances(10), instances(args.instances)

    print(f"pick + release, CPU us (median of 5 x {args.picks}):")
    for kind in ("p2c", "round_robin"):
        a, b = pick_cost_us(kind, small, args.picks), pick_cost_us(kind, large, args.picks)
        print(
            f"  {kind:<12} 10 instances {a:6.2f}   {args.instances} instances {b:6.2f}   ratio {b / a:4.2f}x"
        )
    runs = [consul_update_ms(large) for _ in range(5)]
    whole, one = median(r[0] for r in runs), median(r[1] for r in runs)
    print(
        f"discovery update, consul answer -> balancer (target < 50 ms): {args.instances} new instances "
        f"{whole:.1f} ms; next answer with 1 of {args.instances} changed {one:.1f} ms"
    )

    if not args.skip_local:
        local_ms = asyncio.run(local_update_ms(large))
        print(
            f"discovery update of {args.instances} instances (local registry -> balancer): {local_ms:.1f} ms"
        )


if __name__ == "__main__":
    main()
