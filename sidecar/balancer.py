"""Picking one endpoint among the healthy instances of a service."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from .registry.base import Instance


class RoundRobin:
    """One counter per service name; tolerant of the instance list changing between calls."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def __repr__(self) -> str:
        return f"<RoundRobin services={len(self._counters)}>"

    def pick(self, name: str, instances: Sequence[Instance]) -> Instance:
        counter = self._counters.setdefault(name, itertools.count())
        return instances[next(counter) % len(instances)]
