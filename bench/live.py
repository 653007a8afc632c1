"""Live routing benchmark: gateway + 4 FakeBackend workers over real gRPC and etcd.

Workers run at speeds 1, 1, 0.5, 0.5 with 4 slots each (FakeBackend: simulated
service times, no model). Two gateways share the fleet, one per policy; phases
alternate between them (A B A B ...) with the same seeded arrival schedule and the
same job sizes (each call carries its work in `fake_work_ms`), and the p99 ratio
latency_capacity / weighted_round_robin is reported, median over rounds.

    python -m bench.live            # full: 3 rounds x 2 policies x 20 s
    python -m bench.live --quick    # 1 round x 8 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.procs import Mesh, fake_args
from bench.report import write_results
from bench.stats import median, percentile
from meshserve.client import MeshClient
from meshserve.v1 import inference_pb2

SPEEDS = (1.0, 1.0, 0.5, 0.5)
SLOTS = 4
POLICIES = ("latency_capacity", "weighted_round_robin")  # the arms: one gateway each
READY = 2  # ModelState READY in ListModels
Plan = list[tuple[float, float]]  # (send offset s, work ms)


@dataclass(frozen=True)
class Config:
    rounds: int = 3
    seconds: float = 20.0  # per phase
    warmup: float = 3.0  # first seconds of a phase, not measured
    load: float = 0.85
    mean_ms: float = 40.0
    sigma: float = 1.0
    seed: int = 1
    quick: bool = False

    def quickened(self) -> Config:
        return replace(self, rounds=1, seconds=8.0, warmup=2.0, quick=True)


@dataclass
class Phase:
    """One policy's phase of one round, as measured."""

    policy: str
    round: int
    sent: int
    errors: int
    latencies_ms: list[float]


@dataclass
class PhaseResult:
    policy: str
    round: int
    sent: int
    ok: int
    errors: int
    p50_ms: float
    p99_ms: float
    mean_ms: float


def schedule(seed: int, rate: float, seconds: float, mean_ms: float, sigma: float) -> Plan:
    """Poisson arrivals, lognormal sizes with the given mean."""
    rng = random.Random(seed)
    mu = np.log(mean_ms) - sigma**2 / 2
    out: Plan = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append((t, rng.lognormvariate(mu, sigma)))


def _request(work_ms: float) -> inference_pb2.InferRequest:
    work = inference_pb2.Tensor(name="fake_work_ms", dtype=inference_pb2.DATA_TYPE_FP32,
                                shape=[1], raw_contents=np.float32(work_ms).tobytes())  # fmt: skip
    return inference_pb2.InferRequest(model="fake", inputs=[work])


async def run_phase(target: str, plan: Plan, warmup_s: float) -> tuple[list[float], int]:
    """Open-loop arrivals (the schedule is the point); latencies after the warm-up, ms."""
    latencies: list[float] = []
    errors = 0
    async with MeshClient(target) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(offset: float, work: float) -> None:
            nonlocal errors
            t0 = loop.time()
            try:
                await client.stub.Infer(_request(work), timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                return
            if offset >= warmup_s:
                latencies.append((loop.time() - t0) * 1000)

        tasks = []
        for offset, work in plan:
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(offset, work)))
        await asyncio.gather(*tasks)
    return latencies, errors


async def _wait_fleet(target: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with MeshClient(target) as client:
        while time.monotonic() < deadline:
            try:
                resp = await client.list_models("fake", timeout=2)
                if sum(1 for r in resp.models[0].replicas if r.state == READY) >= n:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)  # polling another process's state at start-up
    raise RuntimeError(f"gateway {target} did not see {n} ready workers in {timeout:.0f} s")


async def start_fleet(mesh: Mesh, cfg: Config) -> dict[str, str]:
    """The workers and one gateway per policy; their addresses once all is ready."""
    etcd = await mesh.start_etcd()
    for i, speed in enumerate(SPEEDS):
        # per_request_ms is the mean job: the unit workers report work in.
        opts = {"slots": str(SLOTS), "speed": str(speed), "per_request_ms": str(cfg.mean_ms),
                "seed": str(i)}  # fmt: skip
        # The static weight a capacity-weighted policy needs (the fair baseline).
        args = [*fake_args(["fake:infer"], opts, 256), "--label", f"weight={speed}"]
        mesh.worker(etcd, args, worker_id=f"fake-{i}", name=f"worker-{i}")
    targets = {
        p: mesh.gateway(etcd, ["--policy", p], name=f"gateway-{p}").address for p in POLICIES
    }
    for t in targets.values():
        await _wait_fleet(t, len(SPEEDS))
    return targets


async def measure(cfg: Config) -> list[Phase]:
    mesh = Mesh(Path(tempfile.mkdtemp(prefix="meshserve-live-")))
    try:
        targets = await start_fleet(mesh, cfg)
        rate = cfg.load * sum(SLOTS * s for s in SPEEDS) / (cfg.mean_ms / 1000)
        plan = schedule(cfg.seed, rate, cfg.seconds, cfg.mean_ms, cfg.sigma)
        print(f"FakeBackend fleet speeds={SPEEDS} slots={SLOTS}; lognormal sizes mean "
              f"{cfg.mean_ms} ms sigma {cfg.sigma}; load {cfg.load} = {rate:.0f} req/s; "
              f"{len(plan)} calls per phase", flush=True)  # fmt: skip
        phases = []
        for rnd in range(cfg.rounds):
            for policy in POLICIES if rnd % 2 == 0 else POLICIES[::-1]:
                lat, errors = await run_phase(targets[policy], plan, cfg.warmup)
                phases.append(Phase(policy, rnd, len(plan), errors, lat))
                print(f"  round {rnd} {policy:22s} p50 {percentile(lat, 50):7.1f} ms  p99 "
                      f"{percentile(lat, 99):7.1f} ms  errors {errors}", flush=True)  # fmt: skip
                mesh.check_alive()
    finally:
        await mesh.close()
    return phases


def analyze(phases: list[Phase], rounds: int) -> dict[str, Any]:
    """Per phase p50 / p99 / mean; per round the p99 ratio; medians over rounds."""
    results = [
        PhaseResult(p.policy, p.round, p.sent, len(p.latencies_ms), p.errors,
                    percentile(p.latencies_ms, 50), percentile(p.latencies_ms, 99),
                    float(np.mean(p.latencies_ms)) if p.latencies_ms else float("nan"))
        for p in phases
    ]  # fmt: skip
    by = {(r.policy, r.round): r for r in results}
    ratios = [by[POLICIES[0], n].p99_ms / by[POLICIES[1], n].p99_ms for n in range(rounds)]
    return {
        "p99_ratio_default_over_wrr_median": median(ratios),
        "p99_ratio_per_round": ratios,
        "p99_ms_default_median": median(r.p99_ms for r in results if r.policy == POLICIES[0]),
        "p99_ms_wrr_median": median(r.p99_ms for r in results if r.policy == POLICIES[1]),
        "phases": [asdict(r) for r in results],
    }


def simulated(cfg: Config) -> dict[str, float]:
    """The same cell in the discrete-event model (bench.fleet), same policy code and the
    gateway's own estimator on a clock in this cell's seconds: speeds, slots, load and
    size distribution as the live run; fresh reports."""
    from bench.fleet import make_workload, simulate
    from gateway.scheduler import build_policy

    out: dict[str, float] = {}
    for policy in POLICIES:
        p99s = []
        for seed in (1, 2, 3):
            work = make_workload(seed, 20_000, f"lognormal{cfg.sigma}", len(SPEEDS))
            sojourn = simulate(SPEEDS, SLOTS, cfg.load, 1.0, work, partial(build_policy, policy),
                               seed=seed, time_unit_s=cfg.mean_ms / 1000)  # fmt: skip
            p99s.append(percentile(sojourn, 99) * cfg.mean_ms)
        out[policy] = median(p99s)
    out["ratio"] = out[POLICIES[0]] / out[POLICIES[1]]
    return out


def plot(summary: dict[str, Any], path: Path, sim: dict[str, float] | None) -> None:
    """p50 and p99 per policy and round (bars), with the simulated p99 (dashed lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = summary["phases"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.35
    for k, policy in enumerate(POLICIES):
        rows = sorted((p for p in phases if p["policy"] == policy), key=lambda p: p["round"])
        xs = [r["round"] + (k - 0.5) * width for r in rows]
        ax.bar(xs, [r["p99_ms"] for r in rows], width, label=f"{policy} p99", alpha=0.85)
        ax.scatter(xs, [r["p50_ms"] for r in rows], marker="_", s=400, color="black")
        if sim is not None:
            ax.axhline(sim[policy], linestyle="--", color=f"C{k}", label=f"{policy} p99, simulated")
    ax.set_xticks(sorted({int(p["round"]) for p in phases}))
    ax.set_xlabel("round (phases alternate between the two gateways)")
    ax.set_ylabel("latency (ms); black ticks: p50")
    ax.set_title("Live: 4 FakeBackend workers (1, 1, 0.5, 0.5x; 4 slots), load 0.85")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=Config.rounds)
    ap.add_argument("--seconds", type=float, default=Config.seconds)
    ap.add_argument("--warmup", type=float, default=Config.warmup)
    ap.add_argument("--load", type=float, default=Config.load)
    ap.add_argument("--mean-ms", type=float, default=Config.mean_ms)
    ap.add_argument("--sigma", type=float, default=Config.sigma)
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--out", type=Path, default=Path("bench/results/live.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/live.png"))
    ap.add_argument("--from-json", type=Path, help="re-plot a saved run (no measurement)")
    a = ap.parse_args(argv)
    cfg = Config(a.rounds, a.seconds, a.warmup, a.load, a.mean_ms, a.sigma, a.seed)
    return (cfg.quickened() if a.quick else cfg), a


def main(argv: list[str] | None = None) -> None:
    cfg, a = parse_args(argv)
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        plot(saved, a.plot, saved.get("simulation") or simulated(cfg))
        print(f"wrote {a.plot}")
        return
    import uvloop

    summary = analyze(uvloop.run(measure(cfg)), cfg.rounds) | {"config": asdict(cfg)}
    write_results(a.out, summary)  # before the simulation: a measured run is kept
    ratio = summary["p99_ratio_default_over_wrr_median"]
    verdict = "PASS" if ratio <= 0.6 else "MISS"
    print(f"p99 latency_capacity / weighted_round_robin = {ratio:.2f} (target <= 0.6): {verdict}")
    sim = summary["simulation"] = simulated(cfg)
    write_results(a.out, summary)
    plot(summary, a.plot, sim)
    off = ratio / sim["ratio"]
    print(
        f"simulation of this cell: p99 {sim[POLICIES[0]]:.0f} ms vs {sim[POLICIES[1]]:.0f} ms, "
        f"ratio {sim['ratio']:.2f}; live / simulated ratio = {off:.2f} "
        f"(target within 25%): {'PASS' if 0.75 <= off <= 1.25 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
