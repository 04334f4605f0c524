"""A short chaos soak (bench/soak.py): three `orders` instances behind a caller sidecar
(`--per-try-timeout 2`), 32 clients sending GETs, POSTs, PUTs and POSTs with an
Idempotency-Key (some uploads slow, so that faults land mid-body), a seeded fault every
2-5 s (SIGKILL or SIGSTOP an app, SIGTERM or SIGKILL a sidecar, each restarted), about
30 s of load.

Only what a correct sidecar guarantees whatever the timing is asserted: a POST without an
Idempotency-Key reaches an app whole at most once (idempotent requests may arrive more
than once: counted, not asserted), a body of any method arrives whole or not at all (a
retry replays it whole), a GET, PUT or keyed POST succeeds while two instances are up for
its whole life (counted from 1.5 s after the soak saw the instance ready until the soak
signalled it: conservative), no answer with a never-reached-an-app error code (one
instance is always up), no sidecar exits unsignalled, no Traceback in a log.
"""

from __future__ import annotations

from bench.soak import run_soak


def test_chaos_soak_keeps_its_promises(procs, tmp_path):
    report = run_soak(seed=1, duration=30.0, workdir=tmp_path, track=procs)
    summary = report.summary()
    print(summary)
    assert report.requests > 1000, summary  # the load ran
    assert report.faults, summary  # and so did the faults
    failed = {name: count for name, count in report.problems().items() if count}
    assert not failed, f"{failed}\n{summary}"
