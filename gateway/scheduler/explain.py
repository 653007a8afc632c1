"""Why the policy would rank workers as it does, for operators (route-explain): each
candidate's inputs, every scorer's value and its place in the ranking. Pure, like the rest
of the scheduler; the policy is copied so that explaining never moves its state (a
rotation cursor, affinity caches)."""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from gateway.scheduler.estimates import gateway_share, predicted_completion, service_prior
from gateway.scheduler.filters import DEFAULT_FILTERS
from gateway.scheduler.scorers import SCORERS
from gateway.scheduler.types import Candidate, Policy, RequestFacts

_INPUTS = tuple(f.name for f in fields(Candidate) if f.name != "worker_id")


@dataclass(frozen=True)
class Explanation:
    worker_id: str
    rank: int | None  # place in the policy's ranking, 0 = chosen; None: not ranked
    filtered_by: str  # the first default filter that would drop it ("" if none)
    inputs: Mapping[str, float]  # the Candidate the policy saw
    scores: Mapping[str, float]  # every scorer in [0, 1], higher is better
    predicted_completion_s: float  # latency_capacity's cost (lower is better)


def explain(
    policy: Policy, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
) -> list[Explanation]:
    """One explanation per candidate, in the policy's order (unranked ones last)."""
    cands = list(candidates)
    ranked = copy.deepcopy(policy).rank(request, cands, rng)
    place = {wid: i for i, wid in enumerate(ranked)}
    prior, share = service_prior(cands), gateway_share(cands)
    scores = {name: fn(request, cands) for name, fn in SCORERS.items()} if cands else {}
    out = []
    for i, c in enumerate(cands):
        dropped = next((f.name for f in DEFAULT_FILTERS if not f.keep(request, c)), "")
        out.append(
            Explanation(
                worker_id=c.worker_id,
                rank=place.get(c.worker_id),
                filtered_by=dropped,
                inputs={name: float(getattr(c, name)) for name in _INPUTS},
                scores={name: values[i] for name, values in scores.items()},
                predicted_completion_s=predicted_completion(c, prior, request.size_hint, share),
            )
        )
    out.sort(key=lambda e: (e.rank is None, e.rank if e.rank is not None else 0, e.worker_id))
    return out
