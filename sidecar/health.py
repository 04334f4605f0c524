"""The app health checker: a probe loop around a pure healthy/unhealthy state machine.

The app starts unhealthy. `rise` passes in a row make it healthy, `fall` failures in a
row make it unhealthy, and only a change is announced (to the inbound gate and to the
registration loop). A probe error is a failed probe, never a crash. The probe is an HTTP
GET of health_path, a TCP connect (no path), or with --health-grpc one call of
grpc.health.v1.Health/Check that passes only on SERVING.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import aiohttp

from .config import AppConfig
from .http.grpc import GrpcProbeError, HealthAnswer, ServingStatus, Status, check_health
from .registry.base import join_host_port

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthState:
    healthy: bool = False
    passes: int = 0  # consecutive passes
    failures: int = 0  # consecutive failures
    output: str = "not probed yet"
    changed_at: float = 0.0
    # The last probe got an answer from the app (an HTTP status, even a failing one, or a
    # TCP connect): the app is up, whatever its health endpoint says. Not so when the
    # probe timed out or was refused (a hung or dead app).
    answering: bool = False


def transition(
    state: HealthState, passed: bool, output: str, rise: int, fall: int, now: float, answering: bool = True
) -> HealthState:
    """The next state after one probe result. Pure: no I/O, no clock."""
    if passed:
        passes, failures = state.passes + 1, 0
        healthy = state.healthy or passes >= rise
    else:
        passes, failures = 0, state.failures + 1
        healthy = state.healthy and failures < fall
    changed_at = now if healthy != state.healthy else state.changed_at
    return replace(
        state,
        healthy=healthy,
        passes=passes,
        failures=failures,
        output=output,
        changed_at=changed_at,
        answering=passed or answering,
    )


def _name(codes: type[enum.IntEnum], value: int) -> str:
    try:
        return codes(value).name
    except ValueError:
        return str(value)


Listener = Callable[[HealthState], Awaitable[None] | None]


class HealthChecker:
    """Probes the app every interval and tells listeners when its health changes."""

    def __init__(self, app: AppConfig) -> None:
        self._cfg = app
        self.state = HealthState(changed_at=time.monotonic())
        self._listeners: list[Listener] = []
        self._session: aiohttp.ClientSession | None = None
        self._where = join_host_port(app.host, app.port)
        self._url = f"http://{self._where}{app.health_path}"
        self.probes = 0
        self._warned_unimplemented = False

    def __repr__(self) -> str:
        word = "healthy" if self.state.healthy else "unhealthy"
        return f"<HealthChecker {word} probes={self.probes} output={self.state.output!r}>"

    @property
    def healthy(self) -> bool:
        return self.state.healthy

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def probe(self) -> tuple[bool, str, bool]:
        """One probe of the app: (passed, output, whether the app answered at all)."""
        cfg = self._cfg
        where = self._where
        try:
            if cfg.health_grpc:
                answer = await check_health(cfg.host, cfg.port, cfg.health_grpc_service, cfg.health_timeout)
                return self._judge_grpc(answer)
            if not cfg.health_path:
                async with asyncio.timeout(cfg.health_timeout):
                    _, writer = await asyncio.open_connection(cfg.host, cfg.port)
                writer.close()
                return True, f"TCP connect to {where} succeeded", True
            assert self._session is not None
            async with self._session.get(self._url, allow_redirects=False) as resp:
                await resp.read()
                return 200 <= resp.status < 400, f"HTTP GET {cfg.health_path}: {resp.status}", True
        except TimeoutError:
            return False, f"probe of {where} timed out after {cfg.health_timeout:g}s", False
        except GrpcProbeError as exc:  # the app answered, only not in gRPC
            return False, f"grpc health of {where} failed: {exc}", True
        except (aiohttp.ClientError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return False, f"probe of {where} failed: {reason}", False

    def _judge_grpc(self, answer: HealthAnswer) -> tuple[bool, str, bool]:
        """Pass only on grpc-status OK with SERVING; any other gRPC answer still shows the app up."""
        if answer.grpc_status == Status.OK:
            if answer.serving == ServingStatus.SERVING:
                return True, "grpc health: SERVING", True
            word = _name(ServingStatus, answer.serving) if answer.serving is not None else "no valid status"
            return False, f"grpc health: {word}", True
        status = _name(Status, answer.grpc_status)
        detail = f": {answer.grpc_message}" if answer.grpc_message else ""
        if answer.grpc_status == Status.UNIMPLEMENTED and not self._warned_unimplemented:
            self._warned_unimplemented = True
            log.warning(
                "configuration error: the app at %s does not serve grpc.health.v1.Health "
                "(UNIMPLEMENTED); drop --health-grpc or add the health service to the app",
                self._where,
            )
        return False, f"grpc health: {status}{detail}", True

    async def mark_down(self, output: str) -> None:
        """The app is known to be gone (it exited): unhealthy now, without waiting to probe."""
        before = self.state
        self.state = replace(
            before, healthy=False, passes=0, output=output, changed_at=time.monotonic(), answering=False
        )
        if before.healthy:
            log.warning("app is unhealthy: %s", output)
            await self._notify()

    async def _notify(self) -> None:
        for listener in self._listeners:
            result = listener(self.state)
            if result is not None:
                await result

    async def check_once(self) -> HealthState:
        passed, output, answering = await self.probe()
        self.probes += 1
        before = self.state
        self.state = transition(
            before,
            passed,
            output,
            self._cfg.healthy_threshold,
            self._cfg.unhealthy_threshold,
            time.monotonic(),
            answering,
        )
        if self.state.healthy != before.healthy:
            if self.state.healthy:
                log.info("app is healthy: %s", output)
            else:
                log.warning("app is unhealthy: %s", output)
            await self._notify()
        return self.state

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._cfg.health_timeout),
            connector=aiohttp.TCPConnector(force_close=True),
            headers={"User-Agent": "micro-sidecar-health"},
        )
        try:
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                await self.check_once()
                elapsed = loop.time() - started
                await asyncio.sleep(max(0.0, self._cfg.health_interval - elapsed))
        finally:
            await self._session.close()
