"""`python -m bench.registry_scale`: runs on fresh etcds, the table, the results file."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench import registry_scale
from bench.registry_scale import verdicts
from bench.registry_scale.analyze import figures
from bench.registry_scale.config import Config
from bench.registry_scale.gauges import pressure
from bench.registry_scale.scenario import run_scenario
from bench.report import machine, results_path, targets_table, write_results
from meshserve.etcd_process import EtcdProcess, find_binary

T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """How to run the scenario, apart from the scenario itself."""

    runs: int
    no_fsync: bool  # diagnosis: etcd with --unsafe-no-fsync (the disk's share)
    logs: Path | None  # keep every process's log here
    out: Path


def parse_args(argv: Sequence[str] | None) -> tuple[Config, Options]:
    doc = registry_scale.__doc__
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    p.add_argument("--workers", type=int, default=Config.workers)
    p.add_argument("--gateways", type=int, default=Config.gateways)
    p.add_argument("--ttl", type=int, default=Config.ttl)
    p.add_argument("--hosts", type=int, default=Config.hosts, help="worker-host processes")
    p.add_argument("--probe-rounds", type=int, default=Config.probe_rounds)
    p.add_argument("--probes", type=int, default=Config.probes, help="per round")
    p.add_argument("--probe-interval", type=float, default=Config.probe_interval_s)
    p.add_argument(
        "--conn-per-worker",
        action="store_true",
        help="one TCP connection per simulated worker (default: one per host)",
    )
    p.add_argument("--runs", type=int, help="whole scenarios, each on a fresh etcd (default 3)")
    p.add_argument("--quick", action="store_true", help="100 workers, 2 probe rounds, 1 run")
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    p.add_argument("--logs", type=Path, help="keep every process's log here (diagnosis)")
    p.add_argument(
        "--etcd-no-fsync",
        action="store_true",
        help="diagnosis: run etcd with --unsafe-no-fsync to see what the disk costs",
    )
    a = p.parse_args(argv)
    quick = a.quick
    cfg = Config(
        workers=100 if quick and a.workers == Config.workers else a.workers,
        gateways=a.gateways,
        ttl=a.ttl,
        hosts=a.hosts,
        probe_rounds=2 if quick and a.probe_rounds == Config.probe_rounds else a.probe_rounds,
        probes=a.probes,
        probe_interval_s=a.probe_interval,
        conn_per_worker=a.conn_per_worker,
    )
    suffixes = (("_quick", quick), ("_connperworker", a.conn_per_worker),
                ("_nofsync", a.etcd_no_fsync))  # fmt: skip
    name = "registry_scale" + "".join(suffix for suffix, on in suffixes if on)
    runs = a.runs or (1 if quick else 3)
    return cfg, Options(runs, a.etcd_no_fsync, a.logs, results_path(a.out, name))


async def one_run(cfg: Config, opt: Options, logs: Path | None) -> dict[str, Any]:
    """A fresh etcd in a temp dir, the scenario against it, then stop it. With `logs`,
    the children's stderr and etcd's log are copied there."""
    flags = ["--unsafe-no-fsync"] if opt.no_fsync else []  # takes the disk out of etcd's path
    with tempfile.TemporaryDirectory(prefix="registry-scale-") as tmp:
        workdir = Path(tmp)
        etcd = EtcdProcess(workdir / "etcd-data", log_path=workdir / "etcd.log", extra_flags=flags)
        await etcd.start()
        psi0, t0 = pressure(), time.monotonic()
        try:
            result = await run_scenario(
                cfg, etcd.endpoint, workdir, etcd_pid=etcd.pid, say=lambda s: print(f"  {s}")
            )
        finally:
            await etcd.stop()
            if logs is not None:
                _copy_logs(workdir, logs)
    wall = time.monotonic() - t0
    # How noisy the shared machine was: share of the run some task waited for a CPU / IO.
    result["noise"] = {
        f"{k}_pressure_pct": round(100 * (pressure()[k] - v) / 1e6 / wall, 1)
        for k, v in psi0.items()
    } | {"wall_s": round(wall, 1)}
    return result


def _copy_logs(workdir: Path, logs: Path) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    for f in [*workdir.glob("*.stderr"), workdir / "etcd.log"]:
        shutil.copy(f, logs / f.name)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop when present, as `meshserve gateway` / `meshserve worker` run."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    cfg, opt = parse_args(argv)
    print(f"registry at scale: {cfg.workers} workers on {cfg.hosts} hosts, {cfg.gateways} "
          f"gateways, TTL {cfg.ttl}s, {opt.runs} run(s), etcd"
          f"{' --unsafe-no-fsync' if opt.no_fsync else ''}, {os.cpu_count()} CPUs")  # fmt: skip
    t0 = time.monotonic()
    results, runs = [], []
    for i in range(opt.runs):
        print(f"run {i + 1}/{opt.runs}")
        logs = opt.logs / f"run{i + 1}" if opt.logs else None
        results.append(_run(one_run(cfg, opt, logs)))
        runs.append(figures(results[-1]))
        print(verdicts.details(results[-1]))
    wall = time.monotonic() - t0
    targets = verdicts.targets(cfg, runs)
    print(f"\n{targets_table(targets)}")
    doc = {
        "benchmark": "registry_scale",
        "command": "python -m bench.registry_scale " + " ".join(sys.argv[1:]),
        "config": {**asdict(cfg), "runs": opt.runs},
        "environment": {
            "etcd_binary": str(find_binary("etcd")),
            "etcd_unsafe_no_fsync": opt.no_fsync,
        },
        "machine": machine(),
        "wall_s": round(wall, 1),
        "verdicts": [t.as_dict() for t in targets],
        "runs": results,
    }
    write_results(opt.out, doc)
    print(f"\n{opt.runs} run(s) in {wall:.0f}s; results in {opt.out}")
    return 0 if all(t.passed for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
