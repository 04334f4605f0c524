import asyncio
import random

import pytest
from multidict import CIMultiDict

from sidecar.retry import (
    ReplayBuffer,
    RetryBudget,
    backoff_delay,
    is_idempotent,
    response_failure,
    retry_eligible,
)


class Clock:
    def __init__(self, t: float = 5000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


NO_HEADERS: dict[str, str] = {}
ALL_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "POST", "PATCH", "CONNECT")

# -- eligibility --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("kind", ["connect_failure", "reset_before_send", "not_forwarded"])
def test_never_sent_is_retried_whatever_the_method(method, kind):
    assert retry_eligible(method, NO_HEADERS, kind)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "get"])
def test_idempotent_methods_retry_on_resets_timeouts_and_gateway_errors(method):
    assert retry_eligible(method, NO_HEADERS, "reset")
    assert retry_eligible(method, NO_HEADERS, "timeout")
    for status in (502, 503, 504):
        assert retry_eligible(method, NO_HEADERS, "status", status)
    for status in (500, 501, 400, 404, 429, 200):
        assert not retry_eligible(method, NO_HEADERS, "status", status)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT"])
def test_non_idempotent_sent_request_is_never_retried(method):
    for kind in ("reset", "timeout"):
        assert not retry_eligible(method, NO_HEADERS, kind)
    for status in (502, 503, 504):
        assert not retry_eligible(method, NO_HEADERS, "status", status)


def test_post_with_idempotency_key_is_retried():
    for headers in (
        CIMultiDict({"idempotency-key": "k1"}),
        {"Idempotency-Key": "k1"},
        {"IDEMPOTENCY-KEY": "x"},
    ):
        assert is_idempotent("POST", headers)
        assert retry_eligible("POST", headers, "reset")
        assert retry_eligible("POST", headers, "status", 503)
    assert not is_idempotent("POST", CIMultiDict({"X-Other": "1"}))


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("kind", ["connect_failure", "reset_before_send", "reset", "timeout", "status"])
def test_a_body_streamed_past_the_buffer_is_never_retried(method, kind):
    headers = {"Idempotency-Key": "k"}
    assert not retry_eligible(method, headers, kind, 503, body_replayable=False)


def test_response_failure_classification():
    assert response_failure(200, {}) is None
    assert response_failure(500, {}) is None
    assert response_failure(503, {}) == "status"
    assert response_failure(503, CIMultiDict({"x-sidecar-error": "draining"})) == "not_forwarded"
    assert (
        response_failure(502, CIMultiDict({"X-Sidecar-Error": "upstream_connect_failed"})) == "not_forwarded"
    )
    # a peer sidecar's 504 means the app may have run the request
    assert response_failure(504, CIMultiDict({"X-Sidecar-Error": "upstream_timeout"})) == "status"
    # so a POST that a draining peer refused goes elsewhere, one that timed out does not
    assert retry_eligible("POST", {}, response_failure(503, {"X-Sidecar-Error": "draining"}) or "status", 503)
    assert not retry_eligible("POST", {}, "status", 504)


# -- backoff ------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_is_capped():
    rng = random.Random(1)
    for attempt, ceiling in ((1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (30, 0.25)):
        delays = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 100  # jittered


# -- budget -------------------------------------------------------------------------------


def test_budget_floor_allows_a_few_retries_without_traffic():
    clock = Clock()
    budget = RetryBudget(0.2, min_retries_per_second=3, window=10, now=clock)
    granted = 0
    while budget.can_retry():
        budget.record_retry()
        granted += 1
        assert granted < 1000
    assert granted == 30  # 3/s x 10 s
    assert budget.exhausted_total == 1


def test_budget_scales_with_requests():
    clock = Clock()
    budget = RetryBudget(0.2, min_retries_per_second=0, window=10, now=clock)
    for _ in range(100):
        budget.record_request()
    granted = 0
    while budget.can_retry():
        budget.record_retry()
        granted += 1
    assert granted == 20


def test_budget_bounds_retries_during_an_outage():
    """Every request fails and wants a retry: retries stay <= ratio*requests + floor*window."""
    clock = Clock()
    ratio, floor, window = 0.2, 3.0, 10.0
    budget = RetryBudget(ratio, min_retries_per_second=floor, window=window, now=clock)
    duration, rate = 60.0, 50  # 50 requests per second for a minute
    retries = requests = 0
    steps = int(duration * rate)
    for _ in range(steps):
        budget.record_request()
        requests += 1
        for _attempt in range(3):  # each request would like up to 3 retries
            if not budget.can_retry():
                break
            budget.record_retry()
            retries += 1
        clock.t += 1 / rate
    windows = duration / window
    assert retries <= ratio * requests + floor * window * windows
    assert retries >= ratio * requests  # the budget is actually spent, not starved
    assert budget.exhausted_total > 0
    assert budget.requests_total == requests and budget.retries_total == retries


def test_budget_window_slides():
    clock = Clock()
    budget = RetryBudget(0.0, min_retries_per_second=1, window=10, now=clock)
    for _ in range(10):
        assert budget.can_retry()
        budget.record_retry()
    assert not budget.can_retry()
    clock.t += 5
    assert not budget.can_retry()
    clock.t += 5.01
    assert budget.can_retry()
    assert "exhausted=2" in repr(budget)


# -- replay buffer ------------------------------------------------------------------------


class chunks:
    """A BodySource (like forward.LimitedBody) over fixed parts; with `hold`, the body's
    end waits for `more` (set it after adding parts): `read()` may be cancelled while it
    waits without losing a part."""

    def __init__(self, *parts: bytes, hold: bool = False) -> None:
        self.parts = list(parts)
        self.more = asyncio.Event()
        if not hold:
            self.more.set()

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        if not self.parts:
            await self.more.wait()  # the rest of the body has not arrived yet
        return self.parts.pop(0) if self.parts else b""


async def collect(stream) -> bytes:
    return b"".join([c async for c in stream])


async def test_replay_buffer_replays_a_small_body():
    buf = ReplayBuffer(chunks(b"abc", b"def"), limit=10)
    assert await collect(buf.body()) == b"abcdef"
    assert buf.replayable and buf.exhausted and buf.consumed == 6
    assert await collect(buf.body()) == b"abcdef"


async def test_replay_after_a_partial_first_attempt():
    buf = ReplayBuffer(chunks(b"aa", b"bb", b"cc"), limit=100)
    first = buf.body()
    assert await anext(first) == b"aa"  # the first attempt failed after one chunk
    second = buf.body()
    assert await anext(second) == b"aa"
    # the abandoned attempt may not take the rest of the body from the new one
    with pytest.raises(RuntimeError, match="superseded"):
        await anext(first)
    assert b"aa" + await collect(second) == b"aabbcc"


async def test_replay_buffer_stops_being_replayable_past_its_limit():
    buf = ReplayBuffer(chunks(b"x" * 6, b"y" * 6, b"z"), limit=10)
    assert await collect(buf.body()) == b"x" * 6 + b"y" * 6 + b"z"
    assert not buf.replayable and buf.consumed == 13
    assert not retry_eligible("GET", {}, "reset", body_replayable=buf.replayable)
    with pytest.raises(RuntimeError, match="cannot be sent again"):
        buf.body()


async def test_body_of_exactly_the_limit_is_replayable():
    buf = ReplayBuffer(chunks(b"a" * 5, b"b" * 5), limit=10)
    assert await collect(buf.body()) == b"a" * 5 + b"b" * 5
    assert buf.replayable
    assert "replayable=True" in repr(buf)


async def test_an_attempt_cancelled_while_the_body_arrives_loses_nothing():
    # issue 12, defect 3: ending an attempt (an early 503, a per-try timeout) cancelled
    # the body read under it, which ended the body; the retry then sent half of it as a
    # complete, well-formed body
    source = chunks(b"first-half;", hold=True)
    buf = ReplayBuffer(source, limit=100)
    first = buf.body()
    assert await anext(first) == b"first-half;"
    reading = asyncio.ensure_future(anext(first))  # waits for the rest of the upload
    await asyncio.sleep(0.01)
    reading.cancel()  # the attempt ends while it waits
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert not buf.exhausted
    second = buf.body()
    source.parts.append(b"second-half")  # the rest of the upload arrives
    source.more.set()
    assert await collect(second) == b"first-half;second-half"
    assert buf.exhausted and buf.consumed == len(b"first-half;second-half")


async def test_empty_body():
    buf = ReplayBuffer(chunks(), limit=10)
    assert await collect(buf.body()) == b""
    assert await collect(buf.body()) == b""
