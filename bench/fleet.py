"""Discrete-event model of one fleet behind one or more gateways, driving real policies.

Each worker has `slots` parallel servers at `speed` (a job of size x takes x / speed) and a
FCFS queue beyond them, so a job's start and finish are fixed the moment it is assigned:
the per-worker heap of slot-free times gives both, and the only events left are
completions (the gateway learns a service time, its in-flight count drops) and load
reports (a worker publishes its in-system count every `report_period`, each worker at its
own phase). A gateway builds each `Candidate` from the last report plus its own sends
since it, its own in-flight, and its EWMA of observed service times, exactly the inputs
the live gateway has, and calls the same `Policy.rank` the gateway calls.

The gateway's accounting mirrors `gateway/stats.py`: when one of its calls ends it takes it
off `sent_since_report` (or, when that is zero, off `reported_inflight`), a report resets
`sent_since_report`, and `service_time` is an EWMA of seconds per unit of work, where the
work is known only after the call (token usage), here the job size times a noise factor
because token counts are only a proxy for compute.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.scheduler import Candidate, Policy, RequestFacts

ORACLE = "oracle"
EWMA_ALPHA = 0.3  # as gateway/stats.py ALPHA: weight of the newest sample
WORK_NOISE = 0.3  # sigma of the lognormal factor between true size and measured work
WARMUP = 0.1  # fraction of the jobs (the first ones) left out of the statistics

FLEETS: dict[str, tuple[float, ...]] = {
    "homogeneous": (1.0,) * 8,
    "two_speed": (1.0,) * 4 + (0.5,) * 4,
    # 0.25x rather than 0.1x: still worth using at high load, so a policy has to weigh it
    # correctly rather than merely avoid it.
    "straggler": (1.0,) * 7 + (0.25,),
}
SIZES = ("exp", "lognormal1.0", "lognormal1.5")


@dataclass(frozen=True)
class Workload:
    """Common random numbers: every arm of a cell sees exactly these jobs."""

    gaps: np.ndarray  # unit-rate exponential inter-arrival times
    sizes: np.ndarray  # job sizes, mean 1
    measured: np.ndarray  # the work the gateway learns at completion (size x noise)
    gateway: np.ndarray  # which gateway (of up to 4) receives each job
    phases: np.ndarray  # each worker's report phase, a fraction of the period


def make_workload(seed: int, n_jobs: int, sizes: str, n_workers: int) -> Workload:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, n_jobs)
    if sizes == "exp":
        size = rng.exponential(1.0, n_jobs)
    elif sizes.startswith("lognormal"):
        sigma = float(sizes.removeprefix("lognormal"))
        size = rng.lognormal(-(sigma**2) / 2, sigma, n_jobs)  # mean exp(mu + s^2/2) = 1
    else:
        raise ValueError(f"unknown size distribution {sizes!r}")
    measured = size * rng.lognormal(0.0, WORK_NOISE, n_jobs)
    gateway = rng.integers(0, 4, n_jobs)
    return Workload(gaps, size, measured, gateway, rng.random(n_workers))


REQUEST = RequestFacts(model="m")


def simulate(
    speeds: Sequence[float],
    slots: int,
    load: float,
    report_period: float,
    work: Workload,
    arm: str | Callable[[], Policy],
    *,
    gateways: int = 1,
    seed: int = 0,
    live_accounting: bool = True,
    per_unit: bool = True,
) -> np.ndarray:
    """Sojourn time of every job after the warm-up, routed by `arm` (or the oracle).

    Ablations: `live_accounting=False` never takes completions off the counts (the report
    plus sends since it, as first specified); `per_unit=False` keeps the EWMA of raw
    seconds per request instead of per unit of work.
    """
    n = len(speeds)
    rate = load * slots * sum(speeds)  # mean size 1: load is utilisation of all slots
    times = (np.cumsum(work.gaps) / rate).tolist()
    sizes = work.sizes.tolist()
    measured = work.measured.tolist()
    who = (work.gateway % gateways).tolist() if gateways > 1 else [0] * len(times)
    ids = [f"w{i}" for i in range(n)]
    index = {wid: i for i, wid in enumerate(ids)}
    slot_free = [[0.0] * slots for _ in range(n)]  # heap: when each slot is next free
    in_system = [0] * n
    reported_at = [0.0] * n
    reported = [[0] * n for _ in range(gateways)]  # each gateway's copy, see the doc
    queued = [0] * n  # waiting beyond the slots, as of the last report
    sent = [[0] * n for _ in range(gateways)]
    inflight = [[0] * n for _ in range(gateways)]
    ewma = [[0.0] * n for _ in range(gateways)]
    views: list[list[Candidate]] = [[Candidate(w, slots) for w in ids] for _ in range(gateways)]
    dirty = [set(range(n)) for _ in range(gateways)]
    oracle = arm == ORACLE
    policies = [arm() for _ in range(gateways)] if callable(arm) else []
    rngs = [random.Random(seed * 7919 + g) for g in range(gateways)]
    # (time, kind, worker, gateway, seconds per unit of work): kind 0 completion, 1 report
    # (completions at the same instant count as done when the report is taken).
    events: list[tuple[float, int, int, int, float]] = [
        (float(p) * report_period, 1, w, 0, 0.0) for w, p in enumerate(work.phases)
    ]
    heapq.heapify(events)
    out = [0.0] * len(times)
    for j, t in enumerate(times):
        while events and events[0][0] <= t:
            at, kind, w, g, seconds = heapq.heappop(events)
            if kind == 0:
                in_system[w] -= 1
                inflight[g][w] -= 1
                if not live_accounting:
                    pass
                elif sent[g][w] > 0:
                    sent[g][w] -= 1
                elif reported[g][w] > 0:
                    reported[g][w] -= 1
                e = ewma[g][w]
                ewma[g][w] = seconds if e == 0.0 else e + EWMA_ALPHA * (seconds - e)
                dirty[g].add(w)
            else:
                reported_at[w] = at
                queued[w] = max(0, in_system[w] - slots)
                for g2 in range(gateways):
                    reported[g2][w] = in_system[w]
                    sent[g2][w] = 0
                    dirty[g2].add(w)
                heapq.heappush(events, (at + report_period, 1, w, 0, 0.0))
        g = who[j]
        if oracle:
            w = _oracle(speeds, slot_free, t, rngs[0])
        else:
            view, rep = views[g], reported[g]
            for d in dirty[g]:
                view[d] = Candidate(
                    worker_id=ids[d],
                    slots=slots,
                    reported_inflight=rep[d],
                    sent_since_report=sent[g][d],
                    gateway_inflight=inflight[g][d],
                    queue_depth=queued[d],
                    service_time=ewma[g][d],
                    report_age=t - reported_at[d],  # as of the rebuild; no policy reads it
                    weight=speeds[d],
                )
            dirty[g].clear()
            w = index[policies[g].rank(REQUEST, view, rngs[g])[0]]
        heap = slot_free[w]
        start = heap[0] if heap[0] > t else t
        service = sizes[j] / speeds[w]
        heapq.heapreplace(heap, start + service)
        sample = service / measured[j] if per_unit else service
        heapq.heappush(events, (start + service, 0, w, g, sample))
        in_system[w] += 1
        sent[g][w] += 1
        inflight[g][w] += 1
        dirty[g].add(w)
        out[j] = start + service - t
    return np.asarray(out[int(len(out) * WARMUP) :])


def _oracle(
    speeds: Sequence[float], slot_free: list[list[float]], t: float, rng: random.Random
) -> int:
    """Least expected completion with exact state: FCFS makes each worker's next start
    time known exactly (its earliest free slot after every job already there); the new
    job's own size is not known, so it counts as the mean (1.0) at that worker's speed."""
    best, best_key = 0, (float("inf"), 0.0)
    for w, speed in enumerate(speeds):
        free = slot_free[w][0]
        key = ((free if free > t else t) + 1.0 / speed, rng.random())
        if key < best_key:
            best, best_key = w, key
    return best
