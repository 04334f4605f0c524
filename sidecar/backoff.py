"""Exponential backoff with full jitter, for every retry loop that talks to a registry."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def __repr__(self) -> str:
        return f"<Backoff failures={self.failures}>"

    def next_delay(self) -> float:
        """The pause before the next attempt; grows with each failure, randomised so that a
        fleet of sidecars does not retry in lockstep after a registry blip."""
        ceiling = min(self.cap, self.base * (2 ** min(self.failures, 16)))
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
