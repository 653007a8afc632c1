"""Routing decision cost: microseconds per `Policy.rank` call for 10, 100 and 1,000 workers.

Candidates come as a lazy sequence that builds a `Candidate` on `__getitem__` (as the
gateway's `gateway.stats.Candidates` does), so a policy pays for what it looks at. Each
figure is the median over repeats of the mean over a batch of decisions, in CPU time of
this process (`time.process_time`): on a shared machine, wall time also counts the time
spent waiting for a core, which is not the decision's cost (`--wall` measures it anyway).

    python -m bench.decision_cost            # 9 repeats
    python -m bench.decision_cost --quick    # 3 repeats
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.report import write_results
from bench.stats import median
from gateway.scheduler import (
    LATENCY_CAPACITY_CONFIG,
    POLICY_NAMES,
    Candidate,
    Policy,
    RequestFacts,
    build_policy,
    with_affinity,
)

SIZES = (10, 100, 1000)
BATCH_SECONDS = 0.02  # each repeat runs about this long
BUDGET_US = 20.0  # the default policy at 1,000 workers


class LazyFleet(Sequence[Candidate]):
    """Per-worker state in plain lists; a Candidate is built per index, every time."""

    def __init__(self, n: int, seed: int = 0, *, expose_ids: bool = False) -> None:
        rng = random.Random(seed)
        self.ids = tuple(f"worker-{i:04d}" for i in range(n))
        self.slots = [rng.choice((1, 4, 8)) for _ in range(n)]
        self.reported = [rng.randint(0, 2 * s) for s in self.slots]
        self.sent = [rng.randint(0, 3) for _ in range(n)]
        self.service = [rng.choice((0.0, 0.8, 1.0, 1.3)) for _ in range(n)]
        self.kv = [rng.random() for _ in range(n)]
        if expose_ids:  # lets affinity see the fleet without building every candidate
            self.worker_ids = self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Candidate:  # type: ignore[override]
        if not 0 <= i < len(self.ids):
            raise IndexError(i)
        return Candidate(
            worker_id=self.ids[i],
            slots=self.slots[i],
            reported_inflight=self.reported[i],
            sent_since_report=self.sent[i],
            gateway_inflight=self.sent[i],
            queue_depth=max(0, self.reported[i] - self.slots[i]),
            service_time=self.service[i],
            kv_cache_use=self.kv[i],
            report_age=0.5,
        )


Arm = tuple[str, Callable[[], Policy], RequestFacts, bool]
PLAIN = RequestFacts(model="m")


def _named(name: str) -> Callable[[], Policy]:
    return lambda: build_policy(name)


def arms() -> list[Arm]:
    out: list[Arm] = [(name, _named(name), PLAIN, False) for name in POLICY_NAMES]
    out.append(
        (
            "composed (latency_capacity config)",
            lambda: build_policy(LATENCY_CAPACITY_CONFIG),
            PLAIN,
            False,
        )
    )
    for exposed in (True, False):
        label = "latency_capacity + affinity" + ("" if exposed else " (ids not exposed)")
        out.append(
            (
                label,
                lambda: with_affinity(build_policy("latency_capacity")),
                RequestFacts(model="m", session_id="user-42"),
                exposed,
            )
        )
    return out


def measure(
    policy: Policy,
    request: RequestFacts,
    fleet: LazyFleet,
    repeats: int,
    clock: Callable[[], float] = time.process_time,
) -> float:
    rng = random.Random(1)
    policy.rank(request, fleet, rng)  # warm caches (affinity's ring)
    start = time.perf_counter()
    for _ in range(10):
        policy.rank(request, fleet, rng)
    batch = max(1, int(BATCH_SECONDS / max((time.perf_counter() - start) / 10, 1e-7)))
    samples = []
    gc.disable()
    try:
        for _ in range(repeats):
            start = clock()
            for _ in range(batch):
                policy.rank(request, fleet, rng)
            samples.append((clock() - start) / batch * 1e6)
    finally:
        gc.enable()
    return median(samples)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="microseconds per routing decision")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else 9
    clock = time.perf_counter if args.wall else time.process_time
    results: dict[str, dict[int, float]] = {}
    for label, make, request, exposed in arms():
        results[label] = {
            n: measure(make(), request, LazyFleet(n, expose_ids=exposed), repeats, clock)
            for n in SIZES
        }
    unit = "µs wall" if args.wall else "µs CPU"
    header = "| policy | " + " | ".join(f"{n:,} workers ({unit})" for n in SIZES) + " |"
    lines = [header, "|---|" + "---|" * len(SIZES)]
    lines += [
        f"| {label} | " + " | ".join(f"{us:.1f}" for us in row.values()) + " |"
        for label, row in results.items()
    ]
    print("\n".join(lines))
    default = results["latency_capacity"][1000]
    verdict = "within" if default <= BUDGET_US else "OVER"
    print(f"\nlatency_capacity at 1,000 workers: {default:.1f} µs ({verdict} {BUDGET_US:.0f} µs)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("decision_cost_quick.json" if args.quick else "decision_cost.json")
    doc = {"repeats": repeats, "clock": "wall" if args.wall else "cpu", "us_per_decision": results}
    write_results(path, doc, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
