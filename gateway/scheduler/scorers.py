"""Scorers: one value per candidate in [0, 1], higher is better, clamped.

A scorer sees the whole evaluated set so it can normalise against it (`expected_delay`
scores relative to the best predicted completion time). The composed policy multiplies
each scorer by its configured weight and sums.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from gateway.scheduler.estimates import (
    gateway_share,
    predicted_completion,
    service_prior,
    slots_of,
)
from gateway.scheduler.types import Candidate, RequestFacts

Scorer = Callable[[RequestFacts, Sequence[Candidate]], list[float]]


def clamp01(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def expected_delay(request: RequestFacts, candidates: Sequence[Candidate]) -> list[float]:
    """best predicted completion / this one's: 1.0 for the fastest, toward 0 for slow ones."""
    prior = service_prior(candidates)
    share = gateway_share(candidates)
    costs = [predicted_completion(c, prior, request.size_hint, share) for c in candidates]
    best = min(costs, default=0.0)
    return [clamp01(best / cost) if cost > 0 else 1.0 for cost in costs]


def queue(_request: RequestFacts, candidates: Sequence[Candidate]) -> list[float]:
    """Free slots fraction (stale-corrected): 0 once every slot is busy."""
    return [clamp01(1.0 - c.inflight_estimate / slots_of(c)) for c in candidates]


def load(_request: RequestFacts, candidates: Sequence[Candidate]) -> list[float]:
    """slots / (slots + in-flight): like `queue` but still ranks saturated workers."""
    out: list[float] = []
    for c in candidates:
        k = slots_of(c)
        out.append(clamp01(k / (k + max(0, c.inflight_estimate))))
    return out


def kv_cache(_request: RequestFacts, candidates: Sequence[Candidate]) -> list[float]:
    """Free KV-cache fraction."""
    return [clamp01(1.0 - c.kv_cache_use) for c in candidates]


def errors(_request: RequestFacts, candidates: Sequence[Candidate]) -> list[float]:
    """Success rate."""
    return [clamp01(1.0 - c.error_rate) for c in candidates]


SCORERS: Mapping[str, Scorer] = {
    "expected_delay": expected_delay,
    "queue": queue,
    "load": load,
    "kv_cache": kv_cache,
    "errors": errors,
}
