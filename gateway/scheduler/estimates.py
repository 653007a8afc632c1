"""Cost estimates shared by the scorers and the default policy (all lower-is-better).

The predicted completion time of a request on a worker with `L` requests in it, `k` slots
and mean service time `s` (FCFS, `k` parallel slots): it starts at once while a slot is
free, otherwise it waits for `L - k + 1` completions, which arrive at rate `k / s`. So

    predicted = s * (max(0, L + 1 - k) / k + h)

where `h` is the request's relative size (`size_hint`, 1.0 typical). With `h = 1` this is
the shortest-expected-delay cost `s * max(1, (L + 1) / k)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median

from gateway.scheduler.types import Candidate


def slots_of(c: Candidate) -> int:
    """At least one: a worker that advertises no capacity still runs one request."""
    return c.slots if c.slots > 0 else 1


def weight_of(c: Candidate) -> float:
    return c.weight if c.weight > 0 else 1.0


def service_prior(candidates: Sequence[Candidate]) -> float:
    """Service time of a unit-weight worker, for candidates with none measured yet.

    The median of the measured ones normalised by their weight (a worker of weight 2 is
    expected to be twice as fast); 1.0 when nothing is measured. Only the candidates being
    evaluated are consulted, so sampling policies stay O(sample).
    """
    known = [c.service_time * weight_of(c) for c in candidates if c.service_time > 0]
    if not known:
        return 1.0
    return known[0] if len(known) == 1 else median(known)


def service_time(c: Candidate, prior: float) -> float:
    return c.service_time if c.service_time > 0 else prior / weight_of(c)


def predicted_completion(c: Candidate, prior: float, size_hint: float = 1.0) -> float:
    """Expected seconds until a new request on `c` completes (see the module doc)."""
    k = slots_of(c)
    waiting = c.inflight_estimate + 1 - k
    h = size_hint if size_hint > 0 else 1.0
    return service_time(c, prior) * ((waiting / k if waiting > 0 else 0.0) + h)


def relative_load(c: Candidate) -> float:
    """Stale-corrected in-flight per slot."""
    return c.inflight_estimate / slots_of(c)
