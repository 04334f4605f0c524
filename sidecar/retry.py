"""Whether a failed attempt may be tried again, and how much retrying the sidecar can afford.

Rules of this file:
- a request that never left (connect failure, our pool to the endpoint full or its wait
  run out, the connection closed before any byte was written, or a peer sidecar that
  answered for itself without reaching its app) is retried whatever its method, and
  costs no retry budget (it put no load on any app);
- otherwise only an idempotent request is retried (GET HEAD OPTIONS PUT DELETE TRACE, or
  any request with an `Idempotency-Key`), and only on a reset, a per-try timeout or a
  502/503/504 answer;
- a retry sends the whole body again or does not happen: a body that streamed past the
  replay buffer is never retried;
- the retry budget caps retries at `ratio` of the recent requests plus a small floor per
  second, so that retries cannot multiply load during an outage.
The deadline still applies: the caller must not retry once its deadline has passed.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Literal, Protocol

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRYABLE_STATUSES = frozenset({502, 503, 504})
# Bytes of a request body kept for a retry: a body that streams past this is sent once.
# (Envoy keeps up to 1 MiB per request; a quarter of that covers the usual JSON uploads
# and keeps a thousand concurrent uploads under 256 MiB.)
REPLAY_LIMIT = 256 * 1024
# A gRPC call is retried only while its whole request is held (at most this much).
GRPC_REPLAY_LIMIT = 64 * 1024
IDEMPOTENCY_KEY = "Idempotency-Key"
# Codes of X-Sidecar-Error answers that a peer sidecar gives without forwarding to its
# app. A peer sidecar drops the X-Sidecar-* headers of its app's answers (an app may relay
# its own sidecar's error), so on an answer from a peer this header is the peer's own.
NOT_FORWARDED_CODES = frozenset(
    {
        "app_unhealthy",
        "draining",
        "upstream_connect_failed",
        "service_overloaded",
        "upstream_pool_full",
        "too_many_connections",
        "identity_unavailable",
    }
)

# How an attempt failed:
#   connect_failure    no connection (refused, unreachable, connect timeout): never sent
#   reset_before_send  the connection broke before any byte of the request was written
#   not_forwarded      the peer sidecar answered itself; its app never saw the request
#   reset              the connection broke after the request (or part of it) was sent
#   timeout            no response headers within the per-try timeout
#   status             the endpoint answered with `status`
#   unavailable        a gRPC trailers-only UNAVAILABLE (14): no response had started
FailureKind = Literal[
    "connect_failure", "reset_before_send", "not_forwarded", "reset", "timeout", "status", "unavailable"
]
NEVER_SENT: frozenset[FailureKind] = frozenset({"connect_failure", "reset_before_send", "not_forwarded"})


def is_idempotent(method: str, headers: Mapping[str, str]) -> bool:
    """RFC 9110 idempotent methods, or any request that carries an Idempotency-Key."""
    if method.upper() in IDEMPOTENT_METHODS or IDEMPOTENCY_KEY in headers:
        return True
    # a plain dict is case-sensitive; multidict's CIMultiDict answered above already
    return any(key.lower() == "idempotency-key" for key in headers)


def retry_eligible(
    method: str,
    headers: Mapping[str, str],
    failure_kind: FailureKind,
    status: int | None = None,
    body_replayable: bool = True,
) -> bool:
    """Whether this failed attempt may be retried on another endpoint (budget aside)."""
    if not body_replayable:
        return False
    if failure_kind in NEVER_SENT or failure_kind == "unavailable":
        return True
    if not is_idempotent(method, headers):
        return False
    if failure_kind == "status":
        return status in RETRYABLE_STATUSES
    return failure_kind in ("reset", "timeout")


def response_failure(status: int, headers: Mapping[str, str]) -> FailureKind | None:
    """Classify an answer: None when it is not a failure worth a retry, else its kind."""
    if status not in RETRYABLE_STATUSES:
        return None
    if headers.get("X-Sidecar-Error") in NOT_FORWARDED_CODES:
        return "not_forwarded"
    return "status"


def grpc_failure(headers: Mapping[str, str], ended: bool) -> FailureKind | None:
    """Classify a gRPC answer: a trailers-only one (`ended`: the head ended the stream)
    with grpc-status 14 never started a response; from a peer sidecar that did not reach
    its app (its X-Sidecar-Error), it never reached an app at all."""
    if not ended or headers.get("grpc-status") != "14":
        return None
    if headers.get("X-Sidecar-Error") in NOT_FORWARDED_CODES:
        return "not_forwarded"
    return "unavailable"


def grpc_unavailable(trailers: list[tuple[str, str]] | None) -> bool:
    """Whether a gRPC answer's trailers say UNAVAILABLE (14)."""
    return trailers is not None and any(k.lower() == "grpc-status" and v.strip() == "14" for k, v in trailers)


def backoff_delay(
    attempt: int, *, base: float = 0.025, cap: float = 0.25, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    Exponential with jitter: uniform in [ceiling/2, ceiling], ceiling = min(cap,
    base * 2**(attempt-1)), so that callers do not retry in lockstep.
    """
    ceiling = min(cap, base * (2 ** max(0, min(attempt - 1, 16))))
    return (rng or random).uniform(ceiling / 2, ceiling)


class RetryBudget:
    """Retries allowed: `ratio` x requests in the last `window` seconds + `min_per_second` x window.

    Call `record_request()` for each original request (not for retries), and before a
    retry `can_retry()`; when it says yes, `record_retry()`. Counts live in `buckets`
    slices of the window, so memory stays constant. The clock is injectable.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        min_retries_per_second: float = 3.0,
        window: float = 10.0,
        buckets: int = 10,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_retries_per_second = min_retries_per_second
        self.window = window
        self._width = window / buckets
        self._buckets = buckets
        self.now = now
        self._slices: deque[list[int]] = deque()  # [slice index, requests, retries]
        self._requests = 0  # within the window
        self._retries = 0
        self.requests_total = 0
        self.retries_total = 0
        self.exhausted_total = 0

    def __repr__(self) -> str:
        self._expire()
        return (
            f"<RetryBudget requests={self._requests} retries={self._retries} "
            f"allowed={self.allowed():.1f} exhausted={self.exhausted_total}>"
        )

    def _expire(self) -> int:
        current = int(self.now() // self._width)
        while self._slices and self._slices[0][0] <= current - self._buckets:
            _, requests, retries = self._slices.popleft()
            self._requests -= requests
            self._retries -= retries
        return current

    def _slice(self) -> list[int]:
        current = self._expire()
        if not self._slices or self._slices[-1][0] != current:
            self._slices.append([current, 0, 0])
        return self._slices[-1]

    def allowed(self) -> float:
        """Retries the window allows in all (spent ones included)."""
        return self.ratio * self._requests + self.min_retries_per_second * self.window

    def record_request(self) -> None:
        self._slice()[1] += 1
        self._requests += 1
        self.requests_total += 1

    def can_retry(self) -> bool:
        """Whether one more retry fits; a no counts as budget exhaustion."""
        self._expire()
        if self._retries + 1 <= self.allowed():
            return True
        self.exhausted_total += 1
        return False

    def record_retry(self) -> None:
        self._slice()[2] += 1
        self._retries += 1
        self.retries_total += 1


class BodySource(Protocol):
    """Where a request body comes from (forward.LimitedBody): `read()` gives the next
    chunk, b"" at the end, and may be cancelled without losing bytes."""

    async def read(self) -> bytes: ...


class ReplayBuffer:
    """Keeps the first `limit` bytes of a request body so a retry can send it again whole.

    `body()` gives one attempt's byte stream: the bytes recorded so far, then the rest of
    the source, recording while the total stays within `limit`. Past that, `replayable`
    turns False and the recording is dropped: no later attempt may start. Each `body()`
    supersedes the previous one: an older stream that tries to read on raises rather
    than send a truncated body. An attempt ended half way (cancelled) loses nothing: the
    next attempt replays what was recorded and reads on from the source.
    """

    def __init__(self, source: BodySource, limit: int = REPLAY_LIMIT) -> None:
        self._source = source
        self.limit = limit
        self._chunks: list[bytes] = []
        self.consumed = 0  # bytes taken from the source
        self.replayable = True
        self.exhausted = False  # the source has ended
        self._generation = 0

    def __repr__(self) -> str:
        return f"<ReplayBuffer consumed={self.consumed} limit={self.limit} replayable={self.replayable}>"

    def body(self) -> AsyncIterator[bytes]:
        """The byte stream for the next attempt. Raises RuntimeError when no longer replayable."""
        if not self.replayable:
            raise RuntimeError("the body streamed past the replay buffer; it cannot be sent again")
        self._generation += 1
        return self._stream(self._generation)

    async def _stream(self, generation: int) -> AsyncIterator[bytes]:
        index = 0
        while True:
            if generation != self._generation:
                raise RuntimeError("superseded by a newer attempt")
            if index < len(self._chunks):
                yield self._chunks[index]
                index += 1
                continue
            if self.exhausted:
                return
            # Only the newest attempt reads the source, and one attempt reads one chunk at
            # a time, so no lock is needed; a cancelled read loses nothing (BodySource).
            chunk = await self._source.read()
            if generation != self._generation:
                raise RuntimeError("superseded by a newer attempt")
            if not chunk:
                self.exhausted = True
                return
            self.consumed += len(chunk)
            if self.replayable and self.consumed <= self.limit:
                self._chunks.append(chunk)
                index += 1
            else:
                self.replayable = False
                self._chunks = []
                index = 0
            yield chunk
