"""Cost estimates shared by the scorers and the default policy (all lower-is-better).

The predicted completion time of a request on a worker with `L` requests in it, `k` slots
and mean service time `s` (FCFS, `k` parallel slots): it starts at once while a slot is
free, otherwise it waits for `L - k + 1` completions, which arrive at rate `k / s`. So

    predicted = s * (max(0, L + 1 - k) / k + h)

where `h` is the request's relative size (`size_hint`, 1.0 typical). With `h = 1` this is
the shortest-expected-delay cost `s * max(1, (L + 1) / k)`. `s` is the EWMA the gateway
keeps (seconds per unit of size, see gateway/stats.py), or a prior while it has none.

`L` is the report plus this gateway's sends since it (its completions already taken off,
so with one gateway it is exact). With several gateways the others' sends since the
report are invisible, and every gateway piles onto the worker that looked light at the
last report. So, with `share` this gateway's part of the load (its in-flight over the
estimated total; 1 with one gateway), L is the mean of two estimates: the report plus
our sends since scaled by 1 / share (symmetric gateways send alike), which ages with the
report, and our own in-flight there scaled by 1 / share, which is current but noisy.
Simulated with four gateways and reports every 5 mean service times, the mean beat
either alone (bench/sim.py; docs/benchmarks.md).
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


# A worker that gets no traffic gets no new measurements: one slow call (a cold start)
# would otherwise mark it slow for good, and it would never be tried again. So an
# estimate that is not refreshed fades toward the fleet's (the prior), halving its
# distance every SERVICE_HALF_LIFE seconds. A worker that really is slow (10x) is then
# tried again about every 2 s and measured slow again; a busy worker's estimate is
# refreshed by its completions long before it fades (tests/integration/test_routing.py).
SERVICE_HALF_LIFE = 0.25


def service_time(c: Candidate, prior: float) -> float:
    typical = prior / weight_of(c)
    if c.service_time <= 0:
        return typical
    if c.service_age <= 0:
        return c.service_time
    keep: float = 0.5 ** (c.service_age / SERVICE_HALF_LIFE)
    return typical + keep * (c.service_time - typical)


MIN_SHARE = 0.05  # at most 20x: beyond that many gateways the estimate is noise anyway


def gateway_share(candidates: Sequence[Candidate]) -> float:
    """This gateway's fraction of the load on `candidates`, in [MIN_SHARE, 1].

    Laplace-smoothed so that a handful of requests cannot swing it far from 1; 1 when
    this gateway has nothing in flight there (no evidence, and nothing to scale).
    """
    own = total = 1
    for c in candidates:
        own += c.gateway_inflight
        total += c.inflight_estimate
    if own == 1:
        return 1.0
    share = own / total
    return 1.0 if share >= 1.0 else max(MIN_SHARE, share)


def load_estimate(c: Candidate, share: float = 1.0) -> float:
    """Requests in the worker now, all gateways together (see the module doc)."""
    if share >= 1.0:
        return float(c.inflight_estimate)
    return (c.reported_inflight + (c.sent_since_report + c.gateway_inflight) / share) / 2


# Real engines batch the requests in their slots, and each step gets slower as the batch
# grows; FCFS-with-slots alone says a busy-but-not-full worker is as good as an idle one,
# which herds traffic onto whichever worker measured a hair faster. This small term
# (service stretched by 10% at full slots) prefers the less loaded of near-equal workers.
BATCH_SLOWDOWN = 0.1


def predicted_completion(
    c: Candidate, prior: float, size_hint: float = 1.0, share: float = 1.0
) -> float:
    """Expected seconds until a new request on `c` completes (see the module doc)."""
    k = slots_of(c)
    load = load_estimate(c, share)
    waiting = load + 1 - k
    h = size_hint if size_hint > 0 else 1.0
    busy = min(load, k) / k
    return service_time(c, prior) * (
        (waiting / k if waiting > 0 else 0.0) + h * (1 + BATCH_SLOWDOWN * busy)
    )


def relative_load(c: Candidate) -> float:
    """Stale-corrected in-flight per slot."""
    return c.inflight_estimate / slots_of(c)
