"""Scheduler simulation: every shipped policy against weighted round robin and an oracle.

A pure model (no gRPC, no FakeBackend): bench/fleet.py drives the same Policy objects the
gateway uses. Grid: fleets of 8 workers (homogeneous; two-speed, half at 0.5x; one
straggler at 0.25x) x job sizes (exponential, lognormal sigma 1.0 and 1.5, mean 1) x load
0.7/0.8/0.9 x 1 and 4 slots per worker x load reports published every 1x (fresh) and 5x
(stale) the mean service time x one gateway, or four gateways sharing the fleet. Every
arm of a cell sees the same arrivals and job sizes (common random numbers); ratios are
taken per seed and the median over seeds is reported.

    python -m bench.sim              # full grid: 3 seeds x 20,000 jobs per cell
    python -m bench.sim --quick      # load 0.9, two size distributions, 1 seed x 5,000 jobs

The gateway in the model is the production accounting (gateway.stats) on a virtual clock
in mean service times; --time-unit says how many seconds one of them is (the estimator's
fading has a half-life in seconds): 1 s by default, a short LLM generation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import sim_report
from bench.fleet import FLEETS, ORACLE, SIZES, make_workload, simulate
from bench.report import write_results
from bench.stats import median, percentiles
from gateway.scheduler import Candidate, Policy, RequestFacts, build_policy
from gateway.scheduler.estimates import predicted_completion, service_prior
from gateway.scheduler.filters import DEFAULT_FILTERS
from gateway.scheduler.pickers import DEFAULT_FULL_SCAN, DEFAULT_SAMPLE, consider, rank_by_cost

LOADS = (0.7, 0.8, 0.9)
SLOTS = (1, 4)
REPORTS = {"fresh": 1.0, "stale": 5.0}  # publishing period in mean service times
DEFAULT = "latency_capacity"


class NoShare:
    """Ablation: latency_capacity without the several-gateways correction (share = 1)."""

    name = "latency_capacity/no_share"

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        evaluated = consider(
            request,
            candidates,
            rng,
            sample=DEFAULT_SAMPLE,
            full_scan=DEFAULT_FULL_SCAN,
            filters=DEFAULT_FILTERS,
        )
        prior = service_prior(evaluated)
        return rank_by_cost(evaluated, lambda c: predicted_completion(c, prior), rng)


@dataclass(frozen=True)
class Arm:
    key: str  # its name in the results
    policy: str  # a POLICY_NAMES entry, "oracle", or "no_share"
    gateways: int = 1
    reports_matter: bool = True  # False: run once, same result for fresh and stale
    live_accounting: bool = True
    per_unit: bool = True

    def factory(self) -> str | Callable[[], Policy]:
        if self.policy == ORACLE:
            return ORACLE
        if self.policy == "no_share":
            return NoShare
        return partial(build_policy, self.policy)


ARMS = (
    Arm("oracle", ORACLE, reports_matter=False),
    Arm("round_robin", "round_robin", reports_matter=False),
    Arm("weighted_round_robin", "weighted_round_robin", reports_matter=False),
    Arm("random", "random", reports_matter=False),
    Arm("least_inflight", "least_inflight", reports_matter=False),
    Arm("least_loaded_naive", "least_loaded_naive"),
    Arm("p2c", "p2c"),
    Arm(DEFAULT, DEFAULT),
    Arm(f"{DEFAULT}@4gw", DEFAULT, gateways=4),
    Arm("least_inflight@4gw", "least_inflight", gateways=4, reports_matter=False),
)
# Why the default is built as it is: each ablation removes one ingredient (a subset of cells).
ABLATIONS = (
    Arm(f"{DEFAULT}/sends_only", DEFAULT, live_accounting=False),
    Arm(f"{DEFAULT}/sends_only@4gw", DEFAULT, gateways=4, live_accounting=False),
    Arm(f"{DEFAULT}/per_request", DEFAULT, reports_matter=False, per_unit=False),
    Arm(f"{DEFAULT}/no_share@4gw", "no_share", gateways=4),
)
ABLATION_CELLS = {"load": 0.9, "sizes": "lognormal1.0"}


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    jobs: int = 20_000  # per cell and seed
    loads: tuple[float, ...] = LOADS
    sizes: tuple[str, ...] = SIZES
    ablations: bool = True
    quick: bool = False
    procs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    time_unit_s: float = 1.0  # seconds per mean service time (the estimator's clock)

    @classmethod
    def quick_grid(cls) -> Config:
        sizes = ("exp", "lognormal1.5")
        return cls(seeds=1, jobs=5_000, loads=(0.9,), sizes=sizes, ablations=False, quick=True)

    @property
    def name(self) -> str:
        return "sim_quick" if self.quick else "sim"

    @property
    def command(self) -> str:
        return "python -m bench.sim" + (" --quick" if self.quick else "")

    def cells(self) -> list[Cell]:
        return [Cell(f, z, ld, k) for k in SLOTS for f in FLEETS for z in self.sizes
                for ld in self.loads]  # fmt: skip


@dataclass(frozen=True)
class Cell:
    fleet: str
    sizes: str
    load: float
    slots: int

    def ablated(self) -> bool:
        return self.load == ABLATION_CELLS["load"] and self.sizes == ABLATION_CELLS["sizes"]


def run_cell(cell: Cell, seed: int, cfg: Config) -> tuple[list[dict[str, Any]], float]:
    """Every arm on one cell and seed; records for both report periods."""
    started = time.perf_counter()
    speeds = FLEETS[cell.fleet]
    work = make_workload(seed, cfg.jobs, cell.sizes, len(speeds))
    arms = ARMS + (ABLATIONS if cfg.ablations and cell.ablated() else ())
    out: list[dict[str, Any]] = []
    for arm in arms:
        periods = REPORTS.items() if arm.reports_matter else [("fresh", REPORTS["fresh"])]
        for reports, period in periods:
            sojourn = simulate(
                speeds,
                cell.slots,
                cell.load,
                period,
                work,
                arm.factory(),
                gateways=arm.gateways,
                seed=seed,
                live_accounting=arm.live_accounting,
                per_unit=arm.per_unit,
                time_unit_s=cfg.time_unit_s,
            )
            p50, p99 = percentiles(sojourn, (50, 99))
            labels = [reports] if arm.reports_matter else list(REPORTS)
            for label in labels:
                out.append(
                    {**asdict(cell), "reports": label, "arm": arm.key, "seed": seed}
                    | {"p50": p50, "p99": p99}
                )
    return out, time.perf_counter() - started


def _median_ratio(
    by: dict[tuple[Any, ...], dict[str, Any]],
    key: tuple[Any, ...],
    other: tuple[Any, ...],
    seeds: list[int],
    stat: str,
) -> float | None:
    """Median over seeds of stat(key) / stat(other), each seed against itself."""
    vals = [by[(*key, s)][stat] / by[(*other, s)][stat] for s in seeds if (*other, s) in by]
    return median(vals) if vals else None


def analyze(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell, report period and arm: medians over seeds of the per-seed ratios."""
    fields = ("fleet", "sizes", "load", "slots", "reports", "arm", "seed")
    by: dict[tuple[Any, ...], dict[str, Any]] = {tuple(r[f] for f in fields): r for r in records}
    groups: dict[tuple[Any, ...], list[int]] = {}
    for key in by:
        groups.setdefault(key[:-1], []).append(key[-1])
    rows = []
    for key, seeds in sorted(groups.items(), key=lambda kv: str(kv[0])):
        *cell, reports, arm = key
        c = tuple(cell)
        base, _, variant = arm.partition("@")
        one = base if (*c, reports, base) in groups else base.split("/")[0]
        row = dict(zip(fields[:4], c, strict=True)) | {"reports": reports, "arm": arm}
        for stat in ("p50", "p99"):
            row[stat] = median(by[(*key, s)][stat] for s in seeds)
        for stat in ("p50", "p99"):
            for name, other in (("oracle", "oracle"), ("wrr", "weighted_round_robin")):
                row[f"{stat}_vs_{name}"] = _median_ratio(by, key, (*c, "fresh", other), seeds, stat)
        stale = reports == "stale"
        row["p99_vs_fresh"] = (
            _median_ratio(by, key, (*c, "fresh", arm), seeds, "p99") if stale else None
        )
        row["p99_vs_1gw"] = (
            _median_ratio(by, key, (*c, reports, one), seeds, "p99") if variant else None
        )
        rows.append(row)
    return rows


def measure(cfg: Config) -> tuple[list[dict[str, Any]], float]:
    """Every cell and seed, in a process pool; the records and the wall time."""
    tasks = [(c, s) for c in cfg.cells() for s in range(1, cfg.seeds + 1)]
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=cfg.procs) as pool:
        futures = [pool.submit(run_cell, c, s, cfg) for c, s in tasks]
        for done, fut in enumerate(as_completed(futures), 1):
            recs, seconds = fut.result()
            records += recs
            r = recs[0]
            cell = f"{r['fleet']} {r['sizes']} load {r['load']} slots {r['slots']}"
            print(f"[{done}/{len(tasks)}] {cell} seed {r['seed']}: {seconds:.1f}s", file=sys.stderr)
    return records, time.perf_counter() - started


def write(doc: dict[str, Any], rows: list[dict[str, Any]], name: str, out: Path | None) -> None:
    """The JSON (bench/results/) and the plot (docs/img/), or both into `out`."""
    json_path = write_results((out or Path("bench/results")) / f"{name}.json", doc, indent=1)
    png_path = (out or Path("docs/img")) / f"{name}.png"
    png_path.parent.mkdir(parents=True, exist_ok=True)
    sim_report.plot(rows, png_path)
    print(f"wrote {json_path} and {png_path} ({doc['wall_s']:.0f} s)")


def rerender(path: Path, out: Path | None) -> None:
    """A saved run's tables, plot and targets again (the targets are recomputed)."""
    saved = json.loads(path.read_text())
    rows = saved["summary"]
    saved["targets"] = sim_report.targets(rows)
    info = {"seeds": saved["seeds"], "n_jobs": saved["jobs_per_cell"], "wall": saved["wall_s"]}
    print(sim_report.render(rows, command=saved["command"], **info))
    write(saved, rows, path.stem, out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small grid, under a minute")
    ap.add_argument("--seeds", type=int, help="seeds per cell (3; quick 1)")
    ap.add_argument("--jobs", type=int, help="jobs per cell and seed (20000; quick 5000)")
    ap.add_argument("--procs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--time-unit", type=float, default=1.0, help="seconds per mean job")
    ap.add_argument("--out", type=Path, help="one folder for the JSON and the PNG (default: "
                    "bench/results/ and docs/img/)")  # fmt: skip
    ap.add_argument("--from-json", type=Path, help="re-render a saved run (no simulation)")
    a = ap.parse_args(argv)
    if a.from_json:
        rerender(a.from_json, a.out)
        return 0
    cfg = Config.quick_grid() if a.quick else Config()
    cfg = replace(cfg, seeds=a.seeds or cfg.seeds, jobs=a.jobs or cfg.jobs, procs=a.procs,
                  time_unit_s=a.time_unit)  # fmt: skip
    records, wall = measure(cfg)
    rows = analyze(records)
    print(sim_report.render(rows, command=cfg.command, seeds=cfg.seeds, n_jobs=cfg.jobs, wall=wall))
    doc = {"command": cfg.command, "seeds": cfg.seeds, "jobs_per_cell": cfg.jobs,
           "time_unit_s": cfg.time_unit_s, "wall_s": round(wall, 1),
           "targets": sim_report.targets(rows), "summary": rows, "runs": records}  # fmt: skip
    write(doc, rows, cfg.name, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
