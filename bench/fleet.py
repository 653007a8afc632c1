"""Discrete-event model of one fleet behind one or more gateways, driving real policies.

Each worker has `slots` parallel servers at `speed` (a job of size x takes x / speed) and a
FCFS queue beyond them, so a job's start and finish are fixed the moment it is assigned:
the per-worker heap of slot-free times gives both, and the only events left are
completions (the gateway learns a service time, its in-flight count drops) and load
reports (a worker publishes its in-system count every `report_period`, each worker at its
own phase). Each gateway keeps the production accounting: one `gateway.stats.WorkerStats`
per worker, driven as its Router drives it (on_send, on_success and on_done when a call
ends, on_report), and the policy ranks the production `gateway.stats.Candidates` built
from them, with the virtual clock as `now`. So the estimator is the gateway's own: the
capped EWMA of seconds per unit of work (the work known only after the call, token usage,
here the job size times a noise factor because tokens are only a proxy for compute) and
the fading of an estimate that is not refreshed.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.scheduler import Policy, RequestFacts
from gateway.stats import Candidates, WorkerStats
from meshserve.load import LoadSnapshot
from meshserve.vocab import ModelKind, ModelState
from registry.records import ModelEntry, WorkerRecord

ORACLE = "oracle"
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


MODEL = "m"
REQUEST = RequestFacts(model=MODEL)
COMPLETION, REPORT = 0, 1  # event kinds; at one instant completions go first


def _records(speeds: Sequence[float], slots: int) -> list[WorkerRecord]:
    """What the gateway's registry view holds: `slots` per worker, its speed as the
    operator's static weight (so weighted round robin is capacity-weighted)."""
    entry = ModelEntry(MODEL, ModelKind.GENERATE, ModelState.READY, "fake",
                       max_concurrency=slots)  # fmt: skip
    return [
        WorkerRecord(f"w{i}", "sim", models=(entry,), capacity=slots, labels={"weight": str(v)})
        for i, v in enumerate(speeds)
    ]


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
    time_unit_s: float = 1.0,
) -> np.ndarray:
    """Sojourn time of every job after the warm-up, routed by `arm` (or the oracle).

    The model's clock counts mean service times; `time_unit_s` is one of them in seconds,
    the clock the production estimator is given (its estimates fade with a half-life in
    seconds). Ablations: `live_accounting=False` never takes completions off the counts
    (the report plus sends since it, as first specified); `per_unit=False` keeps the
    estimate in raw seconds per request instead of per unit of work.
    """
    n = len(speeds)
    rate = load * slots * sum(speeds)  # mean size 1: load is utilisation of all slots
    times = (np.cumsum(work.gaps) / rate).tolist()
    sizes = work.sizes.tolist()
    measured = work.measured.tolist() if per_unit else [1.0] * len(times)
    who = (work.gateway % gateways).tolist() if gateways > 1 else [0] * len(times)
    records = _records(speeds, slots)
    ids = tuple(r.worker_id for r in records)
    index = {wid: i for i, wid in enumerate(ids)}
    slot_free = [[0.0] * slots for _ in range(n)]  # heap: when each slot is next free
    in_system = [0] * n
    # Each gateway's own accounting, as its Router keeps it; reports reach them all.
    stats = [[WorkerStats() for _ in range(n)] for _ in range(gateways)]
    lookup = [dict(zip(ids, row, strict=True)).__getitem__ for row in stats]
    oracle = arm == ORACLE
    policies = [arm() for _ in range(gateways)] if callable(arm) else []
    rngs = [random.Random(seed * 7919 + g) for g in range(gateways)]
    # (time, kind, worker, gateway, service seconds, measured work)
    events: list[tuple[float, int, int, int, float, float]] = [
        (float(p) * report_period, REPORT, w, 0, 0.0, 0.0) for w, p in enumerate(work.phases)
    ]
    heapq.heapify(events)
    unit = time_unit_s
    out = [0.0] * len(times)
    for j, t in enumerate(times):
        while events and events[0][0] <= t:
            at, kind, w, g, seconds, size = heapq.heappop(events)
            if kind == COMPLETION:
                in_system[w] -= 1
                st = stats[g][w]
                # As Router._finish, then Router._done. No report rides on the trailer:
                # reports come on their own schedule. reported=True is the ablation's
                # "never take a completion off the counts" (it only drops in-flight).
                st.on_success(MODEL, seconds * unit, size, None, at * unit)
                st.on_done(reported=not live_accounting)
            else:
                snapshot = LoadSnapshot(
                    in_system[w], queue_depth=max(0, in_system[w] - slots), slots=slots
                )
                for row in stats:  # Router.on_streamed_report, at every gateway
                    row[w].on_report(snapshot, at * unit)
                heapq.heappush(events, (at + report_period, REPORT, w, 0, 0.0, 0.0))
        g = who[j]
        if oracle:
            w = _oracle(speeds, slot_free, t, rngs[0])
        else:
            candidates = Candidates(records, lookup[g], MODEL, t * unit, ids)
            w = index[policies[g].rank(REQUEST, candidates, rngs[g])[0]]
        heap = slot_free[w]
        start = heap[0] if heap[0] > t else t
        service = sizes[j] / speeds[w]
        heapq.heapreplace(heap, start + service)
        heapq.heappush(events, (start + service, COMPLETION, w, g, service, measured[j]))
        in_system[w] += 1
        stats[g][w].on_send()
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
