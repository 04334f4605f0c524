"""Consul intentions, evaluated locally: who may call this service, without a round trip.

Rules of this file:
- One background task keeps a blocking query on
  `/v1/connect/intentions/match?by=destination&name=<service>` current (through the
  ConsulRegistry's `api_request`, so the token stays in a header and out of every message).
  `decide` only reads what that task last stored: no I/O per request.
- Evaluation is Consul's: the match answer lists the intentions in precedence order (an exact
  source before `*`, an exact destination before `*`); the first whose source matches the
  caller decides. An L7 intention (one with `Permissions` instead of an `Action`) denies,
  as Consul's own L4 authorize does.
- No intention matches: Consul's default, read once from the agent's configuration as
  `/v1/agent/self` shows it (`DebugConfig.DefaultIntentionPolicy` when set, else allow with
  ACLs off, else `DebugConfig.ACLResolverSettings.ACLDefaultPolicy`). When the token may not
  read the agent (`agent:read`), the `X-Consul-Default-ACL-Policy` header of the match answer
  gives the ACL default instead.
- Fail static: when Consul cannot be reached (or refuses), the last intentions received stay
  in force and the query is retried with backoff, without blocking until one answers. Before
  any answer, a caller gets the default if it is known, else a denial saying that intentions
  are not loaded yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from ..backoff import Backoff
from ..registry.base import RegistryDenied, RegistryError
from ..registry.consul import ConsulRegistry
from .base import Authorizer, Decision, SpiffeId

log = logging.getLogger(__name__)

WAIT = 60.0
QUICK, PAUSE = 0.05, 0.5
WILDCARD = "*"
POLICIES = ("allow", "deny")


@dataclass(frozen=True, slots=True)
class Rule:
    """One intention of the match answer, as far as deciding needs it."""

    source_ns: str
    source: str
    destination: str
    action: str  # "allow", "deny", or "" for an L7 intention
    precedence: int

    @classmethod
    def from_json(cls, raw: Any) -> Rule:
        action = str(raw.get("Action") or "").lower()
        if raw.get("Permissions") or action not in POLICIES:
            action = ""
        return cls(
            source_ns=str(raw.get("SourceNS") or "default"),
            source=str(raw["SourceName"]),
            destination=str(raw["DestinationName"]),
            action=action,
            precedence=int(raw.get("Precedence") or 0),
        )

    def matches(self, caller: SpiffeId) -> bool:
        return self.source in (caller.service, WILDCARD) and self.source_ns in (caller.namespace, WILDCARD)

    def __str__(self) -> str:
        return f"{self.source} => {self.destination} ({self.action or 'L7'}, precedence {self.precedence})"


def decide(rules: tuple[Rule, ...], caller: SpiffeId, destination: str, default: str | None) -> Decision:
    """The decision for `caller` from rules in evaluation order and the default policy."""
    for rule in rules:
        if rule.matches(caller):
            if not rule.action:
                return Decision(
                    False, f"intention {rule} has L7 permissions, which the sidecar treats as deny"
                )
            return Decision(rule.action == "allow", f"intention {rule}")
    if default is None:
        return Decision(
            False, f"no intention lets {caller.service} call {destination} and the default is unknown"
        )
    return Decision(
        default == "allow",
        f"no intention matches {caller.service} => {destination}; consul's default is {default}",
    )


class ConsulIntentions(Authorizer):
    """Who may call `service`, from Consul intentions kept current by a blocking query."""

    kind = "consul-intentions"

    def __init__(
        self, registry: ConsulRegistry, service: str, *, wait: float = WAIT, retry_cap: float = 5.0
    ) -> None:
        self._registry = registry
        self._service = service
        self._wait = wait
        self._retry_cap = retry_cap
        self._rules: tuple[Rule, ...] | None = None
        self._index = 0
        self._received_at: float | None = None  # monotonic time of the last answer
        self._default: str | None = None
        self._default_source: str | None = None
        self._config_read = False
        self._fail_static = False
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    def __repr__(self) -> str:
        rules = "not loaded" if self._rules is None else f"{len(self._rules)} intentions"
        state = " fail-static" if self._fail_static else ""
        return f"<ConsulIntentions {self._service!r} [{rules}, default {self._default}{state}]>"

    async def open(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"intentions:{self._service}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_loaded(self, timeout: float) -> bool:
        """Whether intentions arrived within `timeout` seconds (for start-up and tests)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._loaded.wait()
        return self._loaded.is_set()

    def decide(self, caller: SpiffeId) -> Decision:
        rules = self._rules
        if rules is None:
            if self._default is None:
                return Decision(
                    False, f"intentions for {self._service} are not loaded yet from consul (default unknown)"
                )
            return Decision(
                self._default == "allow",
                f"intentions for {self._service} are not loaded yet; consul's default is {self._default}",
            )
        return decide(rules, caller, self._service, self._default)

    def describe(self) -> dict[str, object]:
        age = None if self._received_at is None else round(time.monotonic() - self._received_at, 3)
        return {
            "kind": self.kind,
            "service": self._service,
            "intentions": None if self._rules is None else len(self._rules),
            "default": self._default,
            "default_source": self._default_source,
            "age_seconds": age,
            "fail_static": self._fail_static,
            "last_error": self._last_error,
            "index": self._index,
        }

    # -- the watch ----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(base=0.2, cap=self._retry_cap)
        quick = 0
        while True:
            if not self._config_read:
                await self._read_default()
            started, index = time.monotonic(), self._index
            try:
                await self._poll()
            except RegistryError as exc:
                if not self._fail_static:
                    kept = "none yet" if self._rules is None else f"{len(self._rules)} intentions"
                    log.warning(
                        "intentions for %s: %s; keeping the last known (%s)", self._service, exc, kept
                    )
                self._fail_static = True
                self._last_error = str(exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            # A blocking query that keeps answering at once with the same index (no index
            # header, say) must not become a busy loop.
            quick = quick + 1 if self._index == index and time.monotonic() - started < QUICK else 0
            if quick >= 2:
                await asyncio.sleep(PAUSE)

    async def _poll(self) -> None:
        answer = await self._registry.api_request(
            "GET",
            "/v1/connect/intentions/match",
            [("by", "destination"), ("name", self._service)],
            # After a failure, read at once (index 0): what changed meanwhile applies now.
            index=0 if self._fail_static else self._index,
            wait=self._wait,
            op=f"watching the intentions for {self._service!r}",
            needs=f"intentions:read on {self._service!r} (service:read or service:write grants it)",
        )
        if answer.status == 404:
            raise RegistryError(f"consul answered 404 to the intentions match for {self._service!r}")
        try:
            rules = tuple(Rule.from_json(raw) for raw in (answer.body or {}).get(self._service) or ())
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RegistryError(
                f"consul answered the intentions match for {self._service!r} with a malformed body"
            ) from None
        if self._default is None:
            header = answer.headers.get("X-Consul-Default-ACL-Policy", "").lower()
            if header in POLICIES:
                self._default, self._default_source = header, "X-Consul-Default-ACL-Policy"
        if self._fail_static:
            log.info("intentions for %s: consul answers again", self._service)
        self._rules = rules
        self._index = answer.index if answer.index > 0 else self._index
        self._received_at = time.monotonic()
        self._fail_static = False
        self._last_error = None
        self._loaded.set()

    async def _read_default(self) -> None:
        """The default for unmatched callers from the agent's configuration: read until it is
        answered or refused (then the match answer's ACL header stands in)."""
        try:
            body, _ = await self._registry.api_get(
                "/v1/agent/self", op="reading the agent's configuration", needs="agent:read"
            )
        except RegistryDenied as exc:
            self._config_read = True
            log.info(
                "intentions for %s: the ACL default stands in for the agent's config: %s", self._service, exc
            )
            return
        except RegistryError:
            return  # unreachable: the match query says so, and this is read again next round
        self._config_read = True
        debug = (body or {}).get("DebugConfig") or {}
        configured = str(debug.get("DefaultIntentionPolicy") or "").lower()
        acl = str((debug.get("ACLResolverSettings") or {}).get("ACLDefaultPolicy") or "").lower()
        if configured in POLICIES:
            self._default, self._default_source = configured, "default_intention_policy"
        elif not debug.get("ACLsEnabled", False):
            self._default, self._default_source = "allow", "acls disabled"
        elif acl in POLICIES:
            self._default, self._default_source = acl, "acl default policy"
