import pytest
from multidict import CIMultiDict

from sidecar.deadline import DEADLINE_HEADER, TIMEOUT_HEADER, Deadline, from_headers, parse_ms

NOW = 1000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1500", 1.5), ("0", 0.0), (" 250 ", 0.25), ("0000000100", 0.1)],
)
def test_parse_ms_accepts_whole_milliseconds(value, seconds):
    assert parse_ms(value) == seconds


@pytest.mark.parametrize("value", [None, "", "-5", "1.5", "1e3", "abc", "12ms", "٣", "99999999999", "+5"])
def test_parse_ms_ignores_anything_else(value):
    assert parse_ms(value) is None


def test_configured_timeout_without_headers():
    d = from_headers(CIMultiDict(), 30.0, NOW)
    assert d == Deadline(expires_at=NOW + 30.0, budget=30.0, source="config")


def test_caller_timeout_shortens():
    d = from_headers(CIMultiDict({TIMEOUT_HEADER: "2000"}), 30.0, NOW)
    assert (d.budget, d.source) == (2.0, "caller")


def test_upstream_deadline_shortens():
    d = from_headers(CIMultiDict({DEADLINE_HEADER: "800"}), 30.0, NOW)
    assert (d.budget, d.source) == (0.8, "upstream")


def test_smallest_wins():
    both = CIMultiDict({TIMEOUT_HEADER: "500", DEADLINE_HEADER: "900"})
    assert from_headers(both, 30.0, NOW).budget == 0.5
    both = CIMultiDict({TIMEOUT_HEADER: "900", DEADLINE_HEADER: "500"})
    assert from_headers(both, 30.0, NOW).source == "upstream"


def test_a_header_can_never_lengthen_the_configured_timeout():
    d = from_headers(CIMultiDict({TIMEOUT_HEADER: "600000", DEADLINE_HEADER: "600000"}), 5.0, NOW)
    assert (d.budget, d.source) == (5.0, "config")


def test_malformed_headers_are_ignored():
    d = from_headers(CIMultiDict({TIMEOUT_HEADER: "soon", DEADLINE_HEADER: "-1"}), 5.0, NOW)
    assert (d.budget, d.source) == (5.0, "config")


def test_remaining_try_timeout_and_expiry():
    d = from_headers(CIMultiDict({TIMEOUT_HEADER: "1000"}), 30.0, NOW)
    assert d.remaining(NOW + 0.25) == 0.75
    assert d.try_timeout(0.5, NOW + 0.25) == 0.5
    assert d.try_timeout(2.0, NOW + 0.25) == 0.75
    assert d.try_timeout(None, NOW + 0.25) == 0.75
    assert not d.expired(NOW + 0.999)
    assert d.expired(NOW + 1.0)
    assert d.remaining(NOW + 5) == 0.0


def test_zero_budget_is_already_expired():
    d = from_headers(CIMultiDict({DEADLINE_HEADER: "0"}), 30.0, NOW)
    assert d.expired(NOW)


def test_deadline_shrinks_across_two_hops():
    # hop 1: the app asks for 2 s; 300 ms pass before the sidecar sends the request on
    hop1 = from_headers(CIMultiDict({TIMEOUT_HEADER: "2000"}), 30.0, NOW)
    sent = hop1.outgoing_headers(NOW + 0.3)
    assert sent == {DEADLINE_HEADER: "1700", TIMEOUT_HEADER: "1700"}
    # hop 2 (another sidecar, its own clock): 400 ms of work before calling on
    hop2 = from_headers(CIMultiDict(sent), 30.0, 50.0)
    assert hop2.budget == 1.7
    onward = hop2.outgoing_headers(50.4)
    assert int(onward[DEADLINE_HEADER]) == 1300
    assert int(onward[DEADLINE_HEADER]) < int(sent[DEADLINE_HEADER]) < 2000


def test_header_value_rounds_down_and_never_goes_negative():
    d = Deadline(expires_at=NOW + 0.0019, budget=1.0, source="config")
    assert d.header_value(NOW) == "1"
    assert d.header_value(NOW + 10) == "0"


def test_a_grpc_call_takes_its_deadline_from_grpc_timeout_and_passes_it_on_shrunk():
    from sidecar.deadline import GRPC_TIMEOUT_HEADER

    d = from_headers({"grpc-timeout": "1500m"}, 30.0, 100.0, grpc=True)
    assert (d.budget, d.source) == (1.5, "caller")
    out = d.outgoing_headers(100.5)
    assert out[GRPC_TIMEOUT_HEADER] == "1S" and out["X-Sidecar-Deadline-Ms"] == "1000"
    assert ("grpc-timeout", "250m") in d.app_headers(101.25)
    # the previous hop's budget can only shorten it
    d = from_headers({"grpc-timeout": "5S", "X-Sidecar-Deadline-Ms": "800"}, 30.0, 0.0, grpc=True)
    assert (d.budget, d.source) == (0.8, "upstream")


def test_a_grpc_call_without_grpc_timeout_has_no_deadline():
    d = from_headers({}, 30.0, 0.0, grpc=True)
    assert d.unbounded and d.timeout(10.0) is None and d.try_timeout(None, 10.0) is None
    assert d.outgoing_headers(10.0) == {} and d.app_headers(10.0) == []
    assert d.try_timeout(2.0, 10.0) == 2.0  # a per-try timeout still bounds an attempt
