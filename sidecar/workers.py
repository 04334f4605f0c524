"""`--workers N`: N-1 more sidecar processes sharing the inbound and outbound ports.

The primary process binds the listeners with SO_REUSEPORT, so the kernel spreads new
connections over every process bound to the same port. Worker processes forward
traffic only: they probe the app (to gate inbound) and watch discovery themselves, but
the primary alone registers the instance, serves the admin listener and supervises the
app. On stop the primary keeps everyone serving through the drain delay, then tells the
workers to stop accepting and finish their in-flight requests, like itself. A worker
whose primary disappears (SIGKILL) stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


def worker_argv(
    argv: Sequence[str], command: Sequence[str], inbound_port: int, outbound_port: int, index: int
) -> list[str]:
    """The command line of worker `index`: the primary's own flags (without the app's
    command) with the ports the primary got and the worker role appended (click keeps the
    last value of a repeated option)."""
    args = list(argv)
    if command and args[-len(command) :] == list(command):
        args = args[: -len(command)]
        if args and args[-1] == "--":
            args = args[:-1]
    return [
        *args,
        "--inbound-port",
        str(inbound_port),
        "--outbound-port",
        str(outbound_port),
        "--drain-delay",
        "0",
        "--workers",
        "1",
        "--worker-index",
        str(index),
        "--primary-pid",
        str(os.getpid()),
    ]


class Workers:
    def __init__(self, count: int, argv: Sequence[str], command: Sequence[str]) -> None:
        self.count = count
        self.argv = list(argv)
        self.command = list(command)
        self.procs: list[asyncio.subprocess.Process] = []

    def __repr__(self) -> str:
        alive = sum(1 for p in self.procs if p.returncode is None)
        return f"<Workers {alive}/{len(self.procs)} alive>"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def start(self, inbound_port: int, outbound_port: int) -> None:
        for index in range(1, self.count):
            args = worker_argv(self.argv, self.command, inbound_port, outbound_port, index)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", *args, start_new_session=True
            )
            self.procs.append(proc)
        if self.procs:
            log.info("started %d worker process(es): %s", len(self.procs), self.pids)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker (each drains its own in-flight requests), SIGKILL stragglers."""
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        waits = [proc.wait() for proc in self.procs]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            self.kill()
            await asyncio.gather(*(proc.wait() for proc in self.procs))

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()


async def watch_primary(primary_pid: int, interval: float = 0.5) -> None:
    """Return when the primary process is gone (this worker was re-parented)."""
    while primary_pid and os.getppid() == primary_pid:
        await asyncio.sleep(interval)
