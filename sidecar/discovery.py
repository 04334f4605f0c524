"""Service name -> current healthy endpoints, kept fresh by one watcher per name.

A watcher starts on first use and runs blocking queries against the registry. When the
registry fails, the last known endpoints stay in use (fail static) and their age shows
in /status; an authoritative empty answer empties the set; a watcher nobody asked for in
a while stops.
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


class Watch:
    """What the sidecar knows about one service."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.instances: tuple[Instance, ...] = ()
        self.known = False
        self.index = 0
        self.updated_at: float | None = None  # monotonic time of the last good answer
        self.error: str | None = None
        self.last_used = time.monotonic()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Watch {self.name} instances={len(self.instances)} index={self.index} error={self.error!r}>"

    def age(self) -> float | None:
        return None if self.updated_at is None else time.monotonic() - self.updated_at

    def describe(self) -> dict[str, object]:
        age = self.age()
        return {
            "known": self.known,
            "instances": [
                {"id": i.id, "address": i.address, "port": i.port, "tags": list(i.tags)}
                for i in self.instances
            ],
            "index": self.index,
            "age_seconds": None if age is None else round(age, 3),
            "stale": self.error is not None,
            "error": self.error,
        }


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
        """The healthy instances of `name`; raises the SidecarError the caller should see."""
        watch = self.watches.get(name)
        if watch is None or watch.task is None or watch.task.done():
            watch = self._start(name)
        watch.last_used = time.monotonic()
        if not watch.ready.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(watch.ready.wait()), self.first_answer_timeout)
            except TimeoutError:
                pass
        if watch.updated_at is None:
            raise RegistryUnavailableError(
                f"cannot look up {name!r}: {watch.error or 'the registry did not answer in time'}"
            )
        if not watch.known:
            raise UnknownService(f"no service named {name!r} is registered")
        if not watch.instances:
            raise NoHealthyInstance(f"service {name!r} has no healthy instance")
        return watch.instances

    def _start(self, name: str) -> Watch:
        old = self.watches.get(name)
        if old is None and len(self.watches) >= self.max_watches:
            # Every name an app asks for costs a watcher; an app (or a bug in it) asking
            # for endless distinct names must not turn into endless registry queries.
            raise DiscoveryLimit(f"already watching {len(self.watches)} services; not looking up {name!r}")
        watch = Watch(name)
        if old is not None:  # keep what we knew while the new watcher starts
            watch.instances, watch.known, watch.updated_at = old.instances, old.known, old.updated_at
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
            if result.instances != watch.instances or result.known != watch.known:
                watch.instances = result.instances
                log.info(
                    "service %r: %d healthy instance(s)%s",
                    watch.name,
                    len(result.instances),
                    "" if result.known else " (unknown name)",
                )
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
