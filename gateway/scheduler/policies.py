"""The shipped policies, each selectable by name, and the config-composed policy.

Every policy returns the candidates it evaluated, best first, without duplicates: all of
them for full-scan policies and small fleets, a bounded prefix (the sample, or the next
few in rotation) for O(1) policies on large fleets. The Router needs the primary and, on
failure, asks again without the failed worker.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.scheduler.estimates import (
    BATCH_SLOWDOWN,
    SERVICE_HALF_LIFE,
    gateway_share,
    service_prior,
    slots_of,
    weight_of,
)
from gateway.scheduler.filters import DEFAULT_FILTERS, FILTERS, Filter
from gateway.scheduler.pickers import (
    DEFAULT_FULL_SCAN,
    DEFAULT_SAMPLE,
    PICKERS,
    consider,
    rank_by_cost,
    rank_by_score,
    sample_indices,
)
from gateway.scheduler.scorers import SCORERS, Scorer
from gateway.scheduler.types import Candidate, Policy, RequestFacts

MAX_RANKED = 2  # ranking length of O(1) policies on fleets above DEFAULT_FULL_SCAN


def _ranked_len(n: int) -> int:
    # Small fleets: every worker, as a full ranking. Large: the primary and a fallback;
    # building more lazy candidates costs time and the Router re-ranks on retry anyway.
    return n if n <= DEFAULT_FULL_SCAN else MAX_RANKED


class RoundRobin:
    """Plain rotation: ignores speed and load (unstable once workers differ in speed)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        n = len(candidates)
        if n == 0:
            return []
        start = self._next % n
        self._next = start + 1
        return [candidates[(start + i) % n].worker_id for i in range(_ranked_len(n))]


class WeightedRoundRobin:
    """Smooth weighted round robin (nginx), weight = slots x weight: the stable baseline.

    Each pick adds every worker's weight to its running credit, takes the largest credit
    and charges it the total, which interleaves workers instead of sending bursts. O(N)
    per decision by construction: every worker's credit moves.
    """

    name = "weighted_round_robin"

    def __init__(self) -> None:
        self._credit: dict[str, float] = {}

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        cands = list(candidates)
        if not cands:
            return []
        credit = self._credit
        total = 0.0
        for c in cands:
            w = slots_of(c) * weight_of(c)
            credit[c.worker_id] = credit.get(c.worker_id, 0.0) + w
            total += w
        order = sorted(cands, key=lambda c: -credit[c.worker_id])  # stable: first max wins
        credit[order[0].worker_id] -= total
        if len(credit) > 2 * len(cands) + 16:  # forget workers that left
            self._credit = {c.worker_id: credit[c.worker_id] for c in cands}
        return [c.worker_id for c in order]


class RandomChoice:
    """Uniformly random, O(1)."""

    name = "random"

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        n = len(candidates)
        return [candidates[i].worker_id for i in sample_indices(n, _ranked_len(n), rng)]


def _gateway_load(c: Candidate) -> float:
    return (c.gateway_inflight + 1) / slots_of(c)


def _reported_load(c: Candidate) -> float:
    return (c.reported_inflight + 1) / slots_of(c)


def least_inflight(candidates: Sequence[Candidate], rng: random.Random) -> list[str]:
    """This gateway's in-flight per slot, lowest first, ties at random (the first policy)."""
    return rank_by_cost(list(candidates), _gateway_load, rng)


class LeastInflight:
    """Full scan on this gateway's own in-flight per slot: exact with one gateway,
    blind to other gateways' traffic."""

    name = "least_inflight"

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        return least_inflight(candidates, rng)


class LeastLoadedNaive:
    """Full scan on the last report's in-flight per slot alone: the stale-load strawman
    (between reports every request herds onto the same worker)."""

    name = "least_loaded_naive"

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        return rank_by_cost(list(candidates), _reported_load, rng)


class PowerOfTwo:
    """Two random candidates, fewer stale-corrected in-flight wins (raw counts: blind to
    capacity and speed, which is why it can lose to weighted round robin)."""

    name = "p2c"

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        n = len(candidates)
        drawn = [candidates[i] for i in sample_indices(n, min(n, 2), rng)]
        return rank_by_cost(drawn, lambda c: float(c.inflight_estimate), rng)


class LatencyCapacity:
    """The default: lowest predicted completion time (estimates.predicted_completion),
    with other gateways' unseen sends estimated from this gateway's share of the load.

    Evaluates every candidate of a small fleet, else `sample` random ones (power of d
    choices), after the health and KV-headroom filters.
    """

    name = "latency_capacity"

    def __init__(
        self,
        sample: int = DEFAULT_SAMPLE,
        full_scan: int = DEFAULT_FULL_SCAN,
        filters: Sequence[Filter] = DEFAULT_FILTERS,
    ) -> None:
        if sample < 1:
            raise ValueError(f"sample must be >= 1, got {sample}")
        self.sample = sample
        self.full_scan = full_scan
        self.filters = tuple(filters)

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        evaluated = consider(
            request,
            candidates,
            rng,
            sample=self.sample,
            full_scan=self.full_scan,
            filters=self.filters,
        )
        if len(evaluated) <= 1:  # nothing to compare (as in rank_by_cost)
            return [c.worker_id for c in evaluated]
        prior = service_prior(evaluated)
        share = gateway_share(evaluated)
        h = request.size_hint if request.size_hint > 0 else 1.0
        # estimates.predicted_completion inlined (it is the hot loop; a test checks
        # that both agree), with a random second key for uniform tie-breaking.
        keyed = []
        for c in evaluated:
            k = c.slots if c.slots > 0 else 1
            s = c.service_time
            if s <= 0:
                s = prior / (c.weight if c.weight > 0 else 1.0)
            elif c.service_age > 0:  # an estimate nobody refreshed fades to the fleet's
                typical = prior / (c.weight if c.weight > 0 else 1.0)
                s = typical + 0.5 ** (c.service_age / SERVICE_HALF_LIFE) * (s - typical)
            if share < 1.0:
                own = (c.sent_since_report + c.gateway_inflight) / share
                load = (c.reported_inflight + own) / 2
            else:
                load = float(c.reported_inflight + c.sent_since_report)
            waiting = load + 1 - k
            busy = (load if load < k else k) / k
            cost = s * ((waiting / k if waiting > 0 else 0.0) + h * (1 + BATCH_SLOWDOWN * busy))
            keyed.append((cost, rng.random(), c.worker_id))
        keyed.sort()
        return [wid for _, _, wid in keyed]


def _default_scorers() -> dict[str, float]:
    return {"expected_delay": 1.0}


@dataclass(frozen=True)
class PolicyConfig:
    """A policy as data: filters, then a weighted sum of scorers, then a picker.

    picker "argmax" evaluates every candidate; "sample" evaluates `sample` random ones
    (every one when the fleet has at most `full_scan`).
    """

    filters: tuple[str, ...] = ("healthy", "kv_headroom")
    scorers: Mapping[str, float] = field(default_factory=_default_scorers)
    picker: str = "sample"
    sample: int = DEFAULT_SAMPLE
    full_scan: int = DEFAULT_FULL_SCAN  # added field (default): small fleets scan all
    name: str = "composed"

    def __post_init__(self) -> None:
        unknown = [f for f in self.filters if f not in FILTERS]
        unknown += [s for s in self.scorers if s not in SCORERS]
        if unknown:
            known = sorted([*FILTERS, *SCORERS])
            raise ValueError(f"unknown filters/scorers {unknown}; known: {known}")
        if self.picker not in PICKERS:
            raise ValueError(f"unknown picker {self.picker!r}; known: {list(PICKERS)}")
        if any(w < 0 for w in self.scorers.values()) or not any(self.scorers.values()):
            raise ValueError("scorer weights must be >= 0 with at least one > 0")
        if self.picker == "sample" and self.sample < 1:
            raise ValueError(f"sample must be >= 1, got {self.sample}")


class ComposedPolicy:
    """filters -> weighted sum of scorers -> argmax (random tie-break)."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.name = config.name
        self._filters = tuple(FILTERS[f] for f in config.filters)
        self._scorers: tuple[tuple[Scorer, float], ...] = tuple(
            (SCORERS[s], w) for s, w in config.scorers.items() if w > 0
        )
        self._sample = config.sample if config.picker == "sample" else 0

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        evaluated = consider(
            request,
            candidates,
            rng,
            sample=self._sample,
            full_scan=self.config.full_scan,
            filters=self._filters,
        )
        if not evaluated:
            return []
        totals = [0.0] * len(evaluated)
        for scorer, weight in self._scorers:
            for i, s in enumerate(scorer(request, evaluated)):
                totals[i] += weight * s
        return rank_by_score(evaluated, totals, rng)


# latency_capacity as data: it ranks identically (tests check), the class is just faster.
LATENCY_CAPACITY_CONFIG = PolicyConfig(name="latency_capacity_composed")

DEFAULT_POLICY = "latency_capacity"
_FACTORIES = {
    "latency_capacity": LatencyCapacity,
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "random": RandomChoice,
    "least_inflight": LeastInflight,
    "least_loaded_naive": LeastLoadedNaive,
    "p2c": PowerOfTwo,
}
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def build_policy(spec: str | PolicyConfig = DEFAULT_POLICY) -> Policy:
    """A fresh policy (policies keep per-instance state such as a rotation cursor)."""
    if isinstance(spec, PolicyConfig):
        return ComposedPolicy(spec)
    try:
        factory = _FACTORIES[spec]
    except KeyError:
        raise ValueError(f"unknown policy {spec!r}; known: {list(POLICY_NAMES)}") from None
    policy: Policy = factory()
    return policy
