"""Pickers: which candidates to evaluate, and how to turn values into a ranking.

`consider` is the sampling step: every candidate of a small fleet, otherwise `sample`
distinct ones drawn by index (the sequence may be lazy; only what is drawn is built).
Rankings break ties uniformly at random with the injected rng.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from gateway.scheduler.filters import Filter, apply_filters, passes
from gateway.scheduler.types import Candidate, RequestFacts

DEFAULT_SAMPLE = 2  # power of d choices with d = 2: most of the gain, O(1) work
DEFAULT_FULL_SCAN = 8  # fleets this small are evaluated whole (cheap, and strictly better)
RESAMPLE_ROUNDS = 3  # draws of `sample` before accepting filtered-out candidates


def sample_indices(n: int, k: int, rng: random.Random) -> list[int]:
    """`k` distinct indices of `range(n)` in random order, O(k) for k << n."""
    return rng.sample(range(n), k) if k < n else rng.sample(range(n), n)


def consider(
    request: RequestFacts,
    candidates: Sequence[Candidate],
    rng: random.Random,
    *,
    sample: int,
    full_scan: int,
    filters: Sequence[Filter] = (),
) -> Sequence[Candidate]:
    """The filtered candidates a policy evaluates: all when small, else a random sample.

    A sample whose every member is filtered out is drawn again (a few times) rather than
    settling for a bad worker while good ones exist; after that the filter's own
    fall-back (keep everything) applies.
    """
    n = len(candidates)
    if n == 0:
        return ()
    if sample <= 0 or n <= max(full_scan, sample):
        return apply_filters(filters, request, list(candidates))  # a lazy sequence: build once
    drawn: list[Candidate] = []
    for _ in range(RESAMPLE_ROUNDS):
        drawn = [candidates[i] for i in sample_indices(n, sample, rng)]
        if not filters:
            return drawn
        good = [c for c in drawn if passes(filters, request, c)]
        if good:
            return good
    return drawn


def rank_by_cost(
    candidates: Sequence[Candidate], cost: Callable[[Candidate], float], rng: random.Random
) -> list[str]:
    """Lowest cost first; equal costs in uniformly random order."""
    if len(candidates) == 1:
        return [candidates[0].worker_id]
    keyed = sorted((cost(c), rng.random(), c.worker_id) for c in candidates)
    return [wid for _, _, wid in keyed]


def rank_by_score(
    candidates: Sequence[Candidate], scores: Sequence[float], rng: random.Random
) -> list[str]:
    """Highest score first; equal scores in uniformly random order."""
    if len(candidates) == 1:
        return [candidates[0].worker_id]
    keyed = sorted((-s, rng.random(), c.worker_id) for c, s in zip(candidates, scores, strict=True))
    return [wid for _, _, wid in keyed]


PICKERS = ("argmax", "sample")  # evaluate all / evaluate a random sample of `sample`
