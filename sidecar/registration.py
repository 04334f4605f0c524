"""Keeps this instance's registration and health current in the registry.

Registers at start (retrying with backoff while the registry is down, never crashing),
refreshes liveness three times per TTL even when nothing changes, reports each health
change at once, registers again when the registry forgot us, and on stop first marks
the instance critical (so peers stop picking it) and finally deregisters it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .backoff import Backoff
from .health import HealthChecker, HealthState
from .registry.base import (
    CheckSpec,
    Instance,
    RegistrationLost,
    Registry,
    RegistryDenied,
    RegistryError,
    Status,
)

log = logging.getLogger(__name__)

STOP_TIMEOUT = 3.0


class Registration:
    def __init__(
        self, registry: Registry, instance: Instance, check: CheckSpec, health: HealthChecker
    ) -> None:
        self.registry = registry
        self.instance = instance
        self.check = check
        self.health = health
        self.registered = False
        self.draining = False
        self.last_error: str | None = None
        self.last_success: float | None = None  # wall clock, for /status
        self.registrations = 0
        self._wake = asyncio.Event()
        self._denied_logged: set[str] = set()
        health.subscribe(self._on_health)

    def __repr__(self) -> str:
        state = "registered" if self.registered else "unregistered"
        return f"<Registration {self.instance.id} {state} in {self.registry.kind}>"

    def _on_health(self, _state: HealthState) -> None:
        self._wake.set()

    def status(self) -> tuple[Status, str]:
        if self.draining:
            return "critical", "sidecar is shutting down"
        state = self.health.state
        return ("passing" if state.healthy else "critical"), state.output

    def describe(self) -> dict[str, object]:
        return {
            "id": self.instance.id,
            "registered": self.registered,
            "last_error": self.last_error,
            "last_success": self.last_success,
            "registrations": self.registrations,
        }

    async def _sync(self) -> None:
        status, note = self.status()
        if not self.registered:
            await self.registry.register(self.instance, self.check, status, note)
            self.registered = True
            self.registrations += 1
            log.info(
                "registered %s (%s at %s) in the %s registry",
                self.instance.id,
                self.instance.name,
                self.instance.endpoint,
                self.registry.kind,
            )
        else:
            await self.registry.report(self.instance.id, status, note)
        self.last_success = time.time()
        if self.last_error is not None:
            log.info("%s registry reachable again", self.registry.kind)
        self.last_error = None

    async def run(self) -> None:
        backoff = Backoff()
        refresh = self.check.ttl / 3
        while True:
            self._wake.clear()
            try:
                await self._sync()
                backoff.reset()
                delay = refresh
            except RegistrationLost as exc:
                log.warning("%s; registering again", exc)
                self.registered = False
                continue
            except RegistryDenied as exc:
                message = str(exc)
                if message not in self._denied_logged:
                    self._denied_logged.add(message)
                    log.error("%s", message)
                self.last_error = message
                delay = backoff.next_delay()
            except RegistryError as exc:
                if self.last_error is None:
                    log.warning("%s; will keep serving and retry", exc)
                self.last_error = str(exc)
                delay = backoff.next_delay()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def announce_stop(self) -> None:
        """Step one of the graceful stop: tell the registry we are going."""
        self.draining = True
        if not self.registered:
            return
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.registry.report(self.instance.id, "critical", "sidecar is shutting down")
        except (RegistryError, TimeoutError) as exc:
            log.warning("could not mark %s as going: %s", self.instance.id, exc)

    async def deregister(self) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.registry.deregister(self.instance.id)
            self.registered = False
            log.info("deregistered %s", self.instance.id)
        except (RegistryError, TimeoutError) as exc:
            log.warning("could not deregister %s: %s (the registry will expire it)", self.instance.id, exc)
