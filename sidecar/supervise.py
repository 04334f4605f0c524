"""Supervisor mode (`micro-sidecar ... -- cmd args`): the app as a child process.

The child runs in its own process group, so that a signal reaches the app and anything
it spawned, and a Ctrl-C in a terminal reaches the sidecar first (which drains, then
forwards the signal). The child learns where its outbound listener is from
MICRO_SIDECAR_OUTBOUND and which port to listen on from PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


class AppStartError(Exception):
    """The app's command could not be started (not found, not executable)."""


class AppProcess:
    def __init__(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self.command = tuple(command)
        self.env = dict(env)
        self.proc: asyncio.subprocess.Process | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        code = self.proc.returncode if self.proc else None
        return f"<AppProcess {self.command[0]!r} pid={pid} returncode={code}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command, env=self.env, start_new_session=True
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise AppStartError(f"cannot start app {self.command[0]!r}: {exc.strerror or exc}") from exc
        log.info("started app %r (pid %d)", " ".join(self.command), self.proc.pid)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def signal(self, signum: int) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM the app's process group, SIGKILL it after `timeout`; its exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                log.warning("app did not exit within %gs of SIGTERM; killing it", timeout)
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        # Anything the app left behind in its group goes with it (signal() skips an
        # exited app, so kill the group directly).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode
