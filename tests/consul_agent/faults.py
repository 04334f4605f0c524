"""Fault switches: what a test does to the agent to see how its clients cope.

``refuse``, ``error500`` and ``hang`` last until ``none``; ``wipe``, ``reset_index``,
``rotate_root`` and ``leaf_ttl=<seconds>`` happen once (see :meth:`FaultSwitches.set_fault` and
the package docstring). The API socket that ``refuse`` closes and the dispatch that ``error500``
and ``hang`` intercept are in core.py; the CA that ``rotate_root`` and ``leaf_ttl`` change is in
connect.py.
"""

from __future__ import annotations

import asyncio

from .connect import ConnectAPI
from .protocol import parse_duration

FAULTS = ("none", "refuse", "error500", "hang")
ONE_SHOT_FAULTS = ("wipe", "reset_index", "rotate_root", "leaf_ttl=<seconds>")
RESET_INDEX_BASE = 2


class FaultSwitches(ConnectAPI):
    """Switching faults on and off, and the one-shot ones."""

    async def set_fault(self, mode: str) -> None:
        """Switch a fault on (``refuse``, ``error500``, ``hang``), run one (``wipe``,
        ``reset_index``, ``rotate_root``, ``leaf_ttl=<seconds>``) or go back to normal
        (``none`` / ``clear``)."""
        if mode == "clear":
            mode = "none"
        if mode == "wipe":
            self.wipe()
            return
        if mode == "reset_index":
            self.reset_index()
            return
        if mode == "rotate_root":
            self.rotate_root()
            return
        if mode.startswith("leaf_ttl="):
            value = mode.partition("=")[2]
            try:
                seconds = float(value) if value.replace(".", "", 1).isdigit() else parse_duration(value)
            except ValueError:
                raise ValueError(f"leaf_ttl wants seconds or a Go duration, got {value!r}") from None
            self.set_leaf_ttl(seconds)
            return
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {FAULTS + ONE_SHOT_FAULTS}")
        assert self._listener is not None
        self.fault = mode
        event, self._fault_changed = self._fault_changed, asyncio.Event()
        event.set()
        if mode == "refuse":
            await self._listener.close()
        elif not self._listener.is_open:
            self.left.clear()
            await self._listener.open()

    def wipe(self) -> None:
        """Forget services, checks, catalog entries, KV and intentions, and start a new CA (a new
        trust domain), as a restarted dev agent would. Tokens added with :meth:`add_token` stay.
        The index keeps rising."""
        for check in self._checks.values():
            self._stop_runner(check)
        index = self._index
        self._reset_state()
        self._index = index
        self._bootstrap()

    def reset_index(self) -> None:
        """Move the Raft index back to a low value, like restoring an old snapshot: every entity
        is re-stamped with the low index and blocked queries return at once."""
        base = RESET_INDEX_BASE
        self._index = base
        for entity in (
            *self._nodes.values(),
            *self._services.values(),
            *self._checks.values(),
            *self._kv.values(),
        ):
            entity.create_index = base
            entity.modify_index = base
        for name in self._tables:
            self._tables[name] = base
        for name in self._service_index:
            self._service_index[name] = base
        for key in self._tombstones:
            self._tombstones[key] = base
        self._restamp_connect(base)
        self._epoch += 1
        self._notify()
