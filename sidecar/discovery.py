"""Service name -> the endpoints to route to, kept fresh by one watcher per name.

Rules of this file:
- A watcher starts on first use and runs blocking queries against the registry. When the
  registry fails, the last known endpoints stay in use (fail static) and their age shows
  in /status; an authoritative empty answer empties the set; a watcher nobody asked for in
  a while stops.
- Callers get the passing instances. When no registered instance passes, they get every
  instance that is still registered and live, critical ones included ("panic", like
  Envoy's panic threshold): a health blip on every instance at once must not make a
  service vanish while its apps still serve. As soon as one instance passes, only the
  passing ones are used again. "Live" is the registry's notion (local: heartbeat within its
  TTL; Consul: still listed, i.e. not yet removed by DeregisterCriticalServiceAfter); an
  instance that is gone is never routed to. A caller in panic marks its requests with
  `PANIC_HEADER: 1`, which lets them past the callee sidecar's app-health gate
  (`sidecar.inbound`); entering and leaving panic are logged once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .backoff import Backoff
from .errors import DiscoveryLimit, NoHealthyInstance, RegistryUnavailableError, UnknownService
from .registry.base import Instance, Registry, RegistryError

log = logging.getLogger(__name__)

# Set (to "1") by a caller's sidecar on requests to a service in panic; the callee's
# sidecar then forwards to its app even when its app fails its health checks. Headers
# starting with X-Sidecar- are stripped from what apps send and from what reaches apps,
# so only a sidecar can set it.
PANIC_HEADER = "X-Sidecar-Panic"


class Watch:
    """What the sidecar knows about one service."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.instances: tuple[Instance, ...] = ()  # passing
        self.critical: tuple[Instance, ...] = ()  # registered and live, not passing
        # What callers get: `instances`, or `critical` when none passes (then `panic`).
        # The same tuple object while nothing changes (the balancer compares by identity).
        self.serving: tuple[Instance, ...] = ()
        self.panic = False
        self.known = False
        self.index = 0
        self.updated_at: float | None = None  # monotonic time of the last good answer
        self.error: str | None = None
        self.last_used = time.monotonic()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Watch {self.name} instances={len(self.instances)} critical={len(self.critical)} "
            f"panic={self.panic} index={self.index} error={self.error!r}>"
        )

    def age(self) -> float | None:
        return None if self.updated_at is None else time.monotonic() - self.updated_at

    def describe(self) -> dict[str, object]:
        age = self.age()
        return {
            "known": self.known,
            "instances": [_describe(i) for i in self.instances],
            "critical": [_describe(i) for i in self.critical],
            "panic": self.panic,
            "index": self.index,
            "age_seconds": None if age is None else round(age, 3),
            "stale": self.error is not None,
            "error": self.error,
        }

    def update(self, instances: tuple[Instance, ...], critical: tuple[Instance, ...]) -> None:
        """Take a new answer; keeps the old tuples when they are equal (identity for the balancer)."""
        if instances != self.instances:
            self.instances = instances
        if critical != self.critical:
            self.critical = critical
        self.serving = self.instances or self.critical
        panic = not self.instances and bool(self.critical)
        if panic != self.panic:
            self.panic = panic
            if panic:
                log.warning(
                    "service %r: no instance passes its health checks; panic: routing to all "
                    "%d registered instance(s), critical ones included",
                    self.name,
                    len(self.critical),
                )
            elif self.instances:
                log.info(
                    "service %r: %d instance(s) passing again; leaving panic", self.name, len(self.instances)
                )
            else:
                log.info("service %r: no live instance left; leaving panic", self.name)


def _describe(i: Instance) -> dict[str, object]:
    return {"id": i.id, "address": i.address, "port": i.port, "tags": list(i.tags)}


class Discovery:
    def __init__(
        self,
        registry: Registry,
        *,
        wait: float = 30.0,
        idle_after: float = 600.0,
        first_answer_timeout: float = 5.0,
        unknown_idle_after: float = 30.0,
        max_watches: int = 1024,
    ) -> None:
        self.unknown_idle_after = unknown_idle_after
        self.max_watches = max_watches
        self.registry = registry
        self.wait = wait
        self.idle_after = idle_after
        self.first_answer_timeout = first_answer_timeout
        self.watches: dict[str, Watch] = {}

    def __repr__(self) -> str:
        return f"<Discovery watching={sorted(self.watches)}>"

    async def resolve(self, name: str) -> tuple[Instance, ...]:
        """The instances of `name` to route to; raises the SidecarError the caller should see.

        The passing instances, or when none passes the registered critical ones (panic, see
        `panic`). Starts a watcher on first use and waits up to `first_answer_timeout` for its
        first answer.
        """
        watch = self.watches.get(name)
        if watch is None or watch.task is None or watch.task.done():
            watch = self._start(name)
        watch.last_used = time.monotonic()
        if not watch.ready.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(watch.ready.wait()), self.first_answer_timeout)
            except TimeoutError:
                pass
        return self._answer(watch)

    def current(self, name: str) -> tuple[Instance, ...]:
        """What `resolve(name)` would return right now, without waiting or starting a watcher:
        for a retry to re-read the live set. Raises the same SidecarErrors as `resolve`, and
        NoHealthyInstance for a name that is not watched."""
        watch = self.watches.get(name)
        if watch is None:
            raise NoHealthyInstance(f"service {name!r} has no healthy instance (not watched)")
        watch.last_used = time.monotonic()
        return self._answer(watch)

    def panic(self, name: str) -> bool:
        """True when the set handed out for `name` is its critical instances (none passes):
        requests to them should carry `PANIC_HEADER: 1`."""
        watch = self.watches.get(name)
        return watch is not None and watch.panic

    def _answer(self, watch: Watch) -> tuple[Instance, ...]:
        name = watch.name
        if watch.updated_at is None:
            raise RegistryUnavailableError(
                f"cannot look up {name!r}: {watch.error or 'the registry did not answer in time'}"
            )
        if not watch.known:
            raise UnknownService(f"no service named {name!r} is registered")
        if not watch.serving:
            raise NoHealthyInstance(f"service {name!r} has no healthy instance")
        return watch.serving

    def _start(self, name: str) -> Watch:
        old = self.watches.get(name)
        if old is None and len(self.watches) >= self.max_watches:
            # Every name an app asks for costs a watcher; an app (or a bug in it) asking
            # for endless distinct names must not turn into endless registry queries.
            raise DiscoveryLimit(f"already watching {len(self.watches)} services; not looking up {name!r}")
        watch = Watch(name)
        if old is not None:  # keep what we knew while the new watcher starts
            watch.instances, watch.critical = old.instances, old.critical
            watch.serving, watch.panic = old.serving, old.panic
            watch.known, watch.updated_at = old.known, old.updated_at
            if old.updated_at is not None:
                watch.ready.set()
        watch.task = asyncio.create_task(self._watch(watch), name=f"watch:{name}")
        self.watches[name] = watch
        return watch

    async def _watch(self, watch: Watch) -> None:
        backoff = Backoff(base=0.2, cap=10.0)
        while time.monotonic() - watch.last_used < (
            self.idle_after if watch.known else self.unknown_idle_after
        ):
            try:
                result = await self.registry.query(watch.name, watch.index, self.wait)
            except RegistryError as exc:
                if watch.error is None:
                    log.warning("discovery of %r failing, serving last known endpoints: %s", watch.name, exc)
                watch.error = str(exc)
                watch.ready.set()
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            if watch.error is not None:
                log.info("discovery of %r recovered", watch.name)
            watch.error = None
            if result.index < watch.index:
                # The registry's index went backwards (restored or restarted): start over.
                watch.index = 0
            else:
                watch.index = result.index
            if (
                result.instances != watch.instances
                or result.critical != watch.critical
                or result.known != watch.known
            ):
                log.info(
                    "service %r: %d healthy instance(s)%s%s",
                    watch.name,
                    len(result.instances),
                    f", {len(result.critical)} critical" if result.critical else "",
                    "" if result.known else " (unknown name)",
                )
                watch.update(result.instances, result.critical)
            # (an unchanged answer keeps the old tuple: the balancer compares by identity)
            # A name that had instances stays known while we watch it: when its last
            # instance goes away (a restart, a crash) callers see 503, not 404.
            watch.known = result.known or watch.known
            watch.updated_at = time.monotonic()
            watch.ready.set()
        log.debug("discovery of %r idle, stopping its watcher", watch.name)
        if self.watches.get(watch.name) is watch:
            del self.watches[watch.name]

    def describe(self) -> dict[str, object]:
        return {name: watch.describe() for name, watch in sorted(self.watches.items())}

    async def close(self) -> None:
        for watch in self.watches.values():
            if watch.task is not None:
                watch.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch.task
