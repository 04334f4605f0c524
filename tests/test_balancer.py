import random
from collections import Counter

import pytest

from sidecar.balancer import (
    P2C,
    Balancer,
    RoundRobin,
    ServiceOverloaded,
    is_failure,
    make_balancer,
)
from sidecar.errors import NoHealthyInstance, SidecarError
from sidecar.registry.base import Instance


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def inst(n: int, port: int | None = None) -> Instance:
    return Instance(id=f"svc-{n}", name="svc", address="127.0.0.1", port=port or 9000 + n)


THREE = (inst(1), inst(2), inst(3))


def make(kind="p2c", **kw) -> tuple[Balancer, Clock]:
    clock = Clock()
    kw.setdefault("rng", random.Random(7))
    return make_balancer(kind, now=clock, **kw), clock


def fail(b: Balancer, service: str, instances, target_id: str, times: int, outcome="connect_failure"):
    """Send `times` failing requests to the endpoint with `target_id` (excluding the others)."""
    others = [i.id for i in instances if i.id != target_id]
    for _ in range(times):
        lease = b.acquire(service, instances, exclude=others)
        assert lease.instance.id == target_id
        b.release(lease, outcome)


# -- picking -----------------------------------------------------------------------------


def test_round_robin_pick_works_as_before():
    rr = RoundRobin()
    picks = [rr.pick("svc", THREE).id for _ in range(6)]
    assert picks == ["svc-1", "svc-2", "svc-3", "svc-1", "svc-2", "svc-3"]
    assert rr.pick("other", THREE[:1]).id == "svc-1"


def test_make_balancer_by_name():
    assert isinstance(make_balancer("p2c"), P2C)
    assert isinstance(make_balancer("round_robin"), RoundRobin)
    assert isinstance(make_balancer(), P2C)
    with pytest.raises(ValueError, match="unknown balancer 'random'"):
        make_balancer("random")  # type: ignore[arg-type]


def test_empty_set_is_no_healthy_instance():
    b, _ = make()
    with pytest.raises(NoHealthyInstance):
        b.acquire("svc", ())


def test_p2c_steers_away_from_an_endpoint_with_many_outstanding():
    b, _ = make("p2c")
    # svc-1 is slow: 20 requests stuck on it
    stuck = [b.acquire("svc", THREE, exclude={"svc-2", "svc-3"}) for _ in range(20)]
    assert all(lease.instance.id == "svc-1" for lease in stuck)
    picks = Counter()
    for _ in range(300):
        lease = b.acquire("svc", THREE)
        picks[lease.instance.id] += 1
        b.release(lease, 200)
    assert picks["svc-1"] == 0
    assert picks["svc-2"] > 100 and picks["svc-3"] > 100


def test_p2c_spreads_evenly_when_all_are_idle():
    b, _ = make("p2c")
    picks = Counter()
    for _ in range(3000):
        lease = b.acquire("svc", THREE)
        picks[lease.instance.id] += 1
        b.release(lease, "success")
    assert min(picks.values()) > 800


def test_p2c_keeps_outstanding_balanced_under_concurrency():
    b, _ = make("p2c")
    leases = [b.acquire("svc", THREE) for _ in range(30)]
    per = Counter(lease.instance.id for lease in leases)
    assert max(per.values()) - min(per.values()) <= 3


def test_exclude_sends_a_retry_elsewhere():
    for kind in ("p2c", "round_robin"):
        b, _ = make(kind)
        for _ in range(20):
            lease = b.acquire("svc", THREE, exclude={"svc-1", "svc-2"})
            assert lease.instance.id == "svc-3"
            b.release(lease, 200)


def test_all_excluded_falls_back_to_all():
    b, _ = make()
    lease = b.acquire("svc", THREE[:1], exclude={"svc-1"})
    assert lease.instance.id == "svc-1"


# -- leases and stats --------------------------------------------------------------------


def test_outstanding_counts_and_double_release_is_ignored():
    b, _ = make()
    a = b.acquire("svc", THREE)
    c = b.acquire("svc", THREE)
    assert b.outstanding("svc") == 2
    b.release(a, 200)
    b.release(a, 200)
    assert b.outstanding("svc") == 1
    assert a.stats.outstanding >= 0 and a.released
    b.release(c, "cancelled")
    assert b.outstanding("svc") == 0
    assert sum(e["outstanding"] for e in b.describe("svc")) == 0


def test_stats_survive_endpoint_set_changes():
    b, _ = make()
    fail(b, "svc", THREE, "svc-2", 3)
    in_flight = b.acquire("svc", THREE, exclude={"svc-1", "svc-2"})  # on svc-3
    # discovery: svc-3 left, svc-4 joined; svc-2 keeps its failures
    new_set = (inst(1), inst(2), inst(4))
    b.acquire("svc", new_set)
    described = {e["id"]: e for e in b.describe("svc")}
    assert set(described) == {"svc-1", "svc-2", "svc-4"}
    assert described["svc-2"]["consecutive_failures"] == 3
    assert described["svc-4"]["consecutive_failures"] == 0
    # the request in flight to the departed endpoint finishes without harm
    b.release(in_flight, 200)
    assert in_flight.released


def test_same_id_new_address_is_followed():
    b, _ = make()
    b.acquire("svc", (inst(1),))
    lease = b.acquire("svc", (inst(1, port=7777),))
    assert lease.instance.port == 7777


def test_success_resets_consecutive_failures():
    b, _ = make(failures=5)
    fail(b, "svc", THREE, "svc-1", 4)
    lease = b.acquire("svc", THREE, exclude={"svc-2", "svc-3"})
    b.release(lease, 404)  # a 4xx is the endpoint working
    fail(b, "svc", THREE, "svc-1", 4)
    assert b.counts("svc") == (3, 0)


def test_failure_outcomes():
    assert is_failure("connect_failure") and is_failure("reset") and is_failure("timeout")
    assert is_failure(500) and is_failure(503)
    assert not is_failure("success") and not is_failure("cancelled")
    assert not is_failure(200) and not is_failure(404)


# -- ejection ------------------------------------------------------------------------------


def test_ejection_after_n_consecutive_failures():
    ejected = []
    b, _ = make(failures=5, on_eject=lambda svc, i, secs: ejected.append((svc, i.id, secs)))
    fail(b, "svc", THREE, "svc-1", 4, outcome=503)
    assert b.counts("svc") == (3, 0)
    fail(b, "svc", THREE, "svc-1", 1, outcome="reset")
    assert b.counts("svc") == (3, 1)
    assert ejected == [("svc", "svc-1", 30.0)]
    assert b.ejections_total == 1
    for _ in range(100):
        lease = b.acquire("svc", THREE)
        assert lease.instance.id != "svc-1"
        b.release(lease, 200)
    state = {e["id"]: e for e in b.describe("svc")}["svc-1"]
    assert state["health"] == "ejected" and state["ejections"] == 1
    assert state["ejected_for_seconds"] == 30.0
    assert state["ejected_until"] is not None


def test_ejected_endpoint_returns_after_the_period():
    b, clock = make(failures=2, base_ejection=30.0)
    fail(b, "svc", THREE, "svc-1", 2)
    clock.t += 29.9
    assert b.counts("svc") == (3, 1)
    clock.t += 0.2
    assert b.counts("svc") == (3, 0)
    picks = set()
    for _ in range(60):
        lease = b.acquire("svc", THREE)
        picks.add(lease.instance.id)
        b.release(lease, 200)
    assert "svc-1" in picks
    assert {e["id"]: e for e in b.describe("svc")}["svc-1"]["health"] == "healthy"


def test_ejection_period_grows_with_repeated_ejections_and_is_capped():
    periods = []
    b, clock = make(
        failures=1, base_ejection=30.0, max_ejection=100.0, on_eject=lambda s, i, secs: periods.append(secs)
    )
    for _ in range(5):
        fail(b, "svc", THREE, "svc-1", 1)
        clock.t += periods[-1]  # back in rotation
    assert periods == [30.0, 60.0, 90.0, 100.0, 100.0]


def test_ejection_multiplier_resets_after_a_long_good_spell():
    periods = []
    b, clock = make(failures=1, base_ejection=30.0, on_eject=lambda s, i, secs: periods.append(secs))
    fail(b, "svc", THREE, "svc-1", 1)
    clock.t += 30.0
    fail(b, "svc", THREE, "svc-1", 1)
    clock.t += 60.0 + 300.0  # back, then healthy for the max ejection time
    fail(b, "svc", THREE, "svc-1", 1)
    assert periods == [30.0, 60.0, 30.0]


def test_never_eject_more_than_the_max_percent():
    four = tuple(inst(n) for n in range(1, 5))
    b, _ = make(failures=1, max_ejection_percent=50.0)
    for target in ("svc-1", "svc-2", "svc-3", "svc-4"):
        fail(b, "svc", four, target, 1)
    assert b.counts("svc") == (4, 2)
    # three instances, 50%: one at most
    b3, _ = make(failures=1)
    for target in ("svc-1", "svc-2", "svc-3"):
        fail(b3, "svc", THREE, target, 1)
    assert b3.counts("svc") == (3, 1)


def test_a_single_instance_is_never_ejected():
    b, _ = make(failures=1)
    fail(b, "svc", THREE[:1], "svc-1", 10)
    assert b.counts("svc") == (1, 0)


def test_held_back_by_the_cap_it_is_ejected_when_there_is_room():
    b, clock = make(failures=2, base_ejection=10.0)
    fail(b, "svc", THREE, "svc-1", 2)
    fail(b, "svc", THREE, "svc-2", 3)  # no room: stays in
    assert [e["health"] for e in b.describe("svc")] == ["ejected", "healthy", "healthy"]
    clock.t += 10.0  # svc-1 returns; svc-2's next failure ejects it
    fail(b, "svc", THREE, "svc-2", 1)
    assert [e["health"] for e in b.describe("svc")] == ["healthy", "ejected", "healthy"]


def test_all_ejected_or_excluded_falls_back_rather_than_failing():
    b, _ = make(failures=1, max_ejection_percent=100.0)
    two = THREE[:2]
    fail(b, "svc", two, "svc-1", 1)
    fail(b, "svc", two, "svc-2", 1)
    assert b.counts("svc") == (2, 2)
    lease = b.acquire("svc", two)
    assert lease.instance.id in {"svc-1", "svc-2"}
    # both ejected; with svc-1 excluded, svc-2 is what is left
    lease = b.acquire("svc", two, exclude={"svc-1"})
    assert lease.instance.id == "svc-2"


def test_ejected_endpoint_not_excluded_is_chosen_over_nothing():
    b, _ = make(failures=1)
    fail(b, "svc", THREE, "svc-1", 1)
    # a retry that already tried svc-2 and svc-3: the ejected svc-1 is all that is left
    lease = b.acquire("svc", THREE, exclude={"svc-2", "svc-3"})
    assert lease.instance.id == "svc-1"


def test_services_are_independent():
    b, _ = make(failures=1)
    other = tuple(Instance(id=f"o-{n}", name="o", address="127.0.0.1", port=8000 + n) for n in range(3))
    fail(b, "svc", THREE, "svc-1", 1)
    assert b.counts("svc") == (3, 1)
    assert b.counts("o") == (0, 0)
    b.acquire("o", other)
    assert b.counts("o") == (3, 0)
    assert b.services() == ["o", "svc"]
    assert sorted(b.describe_all()) == ["o", "svc"]
    assert [e["health"] for e in b.describe_all()["svc"]] == ["ejected", "healthy", "healthy"]


# -- concurrency limit ----------------------------------------------------------------------


def test_concurrency_limit_is_a_fast_503():
    b, _ = make(max_outstanding=2)
    a = b.acquire("svc", THREE)
    b.acquire("svc", THREE)
    with pytest.raises(ServiceOverloaded) as info:
        b.acquire("svc", THREE)
    assert isinstance(info.value, SidecarError) and info.value.status == 503
    assert info.value.code == "service_overloaded"
    b.release(a, 200)
    b.acquire("svc", THREE)


# -- repr -------------------------------------------------------------------------------------


def test_repr_shows_live_state():
    b, _ = make(failures=1)
    assert repr(b) == "<P2C services=0 endpoints=0 outstanding=0 ejected=0>"
    lease = b.acquire("svc", THREE)
    fail(b, "svc", THREE, "svc-1", 1)
    assert repr(b) == "<P2C services=1 endpoints=3 outstanding=1 ejected=1>"
    assert repr(lease).startswith("<Lease svc -> svc-") and repr(lease).endswith(" open>")
    assert repr(RoundRobin()).startswith("<RoundRobin services=0")


# -- large services: picks draw a few endpoints instead of scanning them all -------------

MANY = tuple(inst(n, 20000 + n) for n in range(10_000))


@pytest.mark.parametrize("kind", ["p2c", "round_robin"])
def test_large_service_spreads_picks_and_avoids_ejected_and_excluded(kind):
    b, _ = make(kind, failures=1)
    for i in range(0, 200, 2):  # eject 100 endpoints (well under the 50% cap)
        others = [x.id for x in MANY[:300] if x.id != MANY[i].id]
        lease = b.acquire("big", MANY[:300], exclude=others)
        b.release(lease, "connect_failure")
    ejected = {d["id"] for d in b.describe("big") if d["health"] == "ejected"}
    assert len(ejected) == 100
    picked = Counter()
    exclude = {MANY[1].id, MANY[3].id}
    for _ in range(3000):
        lease = b.acquire("big", MANY[:300], exclude=exclude)
        picked[lease.instance.id] += 1
        b.release(lease, 200)
    assert not set(picked) & ejected
    assert not set(picked) & exclude
    assert len(picked) > 150  # spread over the remaining endpoints, not stuck on a few


def test_p2c_draws_prefer_the_less_loaded_of_two():
    b, _ = make("p2c")
    busy = [b.acquire("big", MANY) for _ in range(200)]  # hold 200 leases open
    held = Counter(lease.instance.id for lease in busy)
    fresh = [b.acquire("big", MANY) for _ in range(200)]
    # a loaded endpoint is picked again only if both draws hit loaded ones
    again = sum(1 for lease in fresh if lease.instance.id in held)
    assert again < 10
    for lease in busy + fresh:
        b.release(lease, 200)
    assert b.outstanding("big") == 0
