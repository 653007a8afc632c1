"""Least-in-flight: the first policy. The latency-and-capacity scheduler replaces it."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """The scheduler's view of one worker for one request."""

    worker_id: str
    inflight: int  # requests this gateway has in flight there
    capacity: int  # the worker's advertised max in flight (0: unknown)


def least_inflight(candidates: Sequence[Candidate], rng: random.Random) -> list[str]:
    """Rank by in-flight relative to capacity; ties broken at random.

    Returns every candidate, best first: the Router uses the tail as fallbacks.
    """

    def cost(c: Candidate) -> float:
        # Relative load, so a worker with twice the slots takes twice the work.
        return (c.inflight + 1) / c.capacity if c.capacity > 0 else float(c.inflight + 1)

    shuffled = list(candidates)
    rng.shuffle(shuffled)
    return [c.worker_id for c in sorted(shuffled, key=cost)]
