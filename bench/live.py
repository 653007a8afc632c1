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
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from meshserve.client import MeshClient
from meshserve.etcd_process import EtcdProcess, free_port
from meshserve.v1 import inference_pb2

SPEEDS = (1.0, 1.0, 0.5, 0.5)
SLOTS = 4
POLICIES = ("latency_capacity", "weighted_round_robin")


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


def schedule(
    seed: int, rate: float, seconds: float, mean_ms: float, sigma: float
) -> list[tuple[float, float]]:
    """(send offset s, work ms) pairs: Poisson arrivals, lognormal sizes with the given mean."""
    rng = random.Random(seed)
    mu = np.log(mean_ms) - sigma**2 / 2
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append((t, rng.lognormvariate(mu, sigma)))


def _request(work_ms: float) -> inference_pb2.InferRequest:
    return inference_pb2.InferRequest(
        model="fake",
        inputs=[
            inference_pb2.Tensor(
                name="fake_work_ms",
                dtype=inference_pb2.DATA_TYPE_FP32,
                shape=[1],
                raw_contents=np.float32(work_ms).tobytes(),
            )
        ],
    )


async def run_phase(
    target: str, plan: list[tuple[float, float]], warmup_s: float
) -> tuple[list[float], int, int]:
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
                await asyncio.sleep(delay)  # open-loop arrivals: the schedule is the point
            tasks.append(asyncio.create_task(one(offset, work)))
        await asyncio.gather(*tasks)
    return latencies, len(plan), errors


async def _spawn(args: list[str], log: Path) -> asyncio.subprocess.Process:
    fh = log.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshserve", "--log-level", "warning", *args,
            stdout=fh, stderr=fh, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        fh.close()


async def _wait_fleet(target: str, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with MeshClient(target) as client:
        while time.monotonic() < deadline:
            try:
                resp = await client.list_models("fake", timeout=2)
                if sum(1 for r in resp.models[0].replicas if r.state == 2) >= n:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)  # polling another process's state at start-up
    raise RuntimeError(f"gateway {target} did not see {n} ready workers in {timeout:.0f} s")


async def main_async(a: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="meshserve-live-"))
    etcd = EtcdProcess(work / "etcd", log_path=work / "etcd.log")
    await etcd.start()
    procs: list[asyncio.subprocess.Process] = []
    targets: dict[str, str] = {}
    try:
        for i, speed in enumerate(SPEEDS):
            # per_request_ms is the mean job: the unit workers report work in.
            opts = [f"slots={SLOTS}", f"speed={speed}", f"per_request_ms={a.mean_ms}", f"seed={i}"]
            args = [
                "worker",
                "--fake",
                "fake:infer",
                "--worker-id",
                f"fake-{i}",
                "--capacity",
                "256",
            ]
            # The static weight a capacity-weighted policy needs (the fair baseline).
            args += ["--etcd", etcd.endpoint, "--label", f"weight={speed}"]
            for o in opts:
                args += ["--fake-option", o]
            procs.append(await _spawn(args, work / f"worker-{i}.log"))
        for policy in POLICIES:
            port = free_port()
            targets[policy] = f"127.0.0.1:{port}"
            procs.append(
                await _spawn(
                    [
                        "gateway",
                        "--listen",
                        targets[policy],
                        "--etcd",
                        etcd.endpoint,
                        "--policy",
                        policy,
                    ],
                    work / f"gateway-{policy}.log",
                )
            )
        for t in targets.values():
            await _wait_fleet(t, len(SPEEDS))
        capacity = sum(SLOTS * s for s in SPEEDS) / (a.mean_ms / 1000)  # jobs/s at load 1
        rate = a.load * capacity
        plan = schedule(a.seed, rate, a.seconds, a.mean_ms, a.sigma)
        print(
            f"FakeBackend fleet speeds={SPEEDS} slots={SLOTS}; lognormal sizes mean "
            f"{a.mean_ms} ms sigma {a.sigma}; load {a.load} = {rate:.0f} req/s; "
            f"{len(plan)} calls per phase",
            flush=True,
        )
        results: list[PhaseResult] = []
        for rnd in range(a.rounds):
            order = POLICIES if rnd % 2 == 0 else POLICIES[::-1]
            for policy in order:
                lat, sent, errors = await run_phase(targets[policy], plan, a.warmup)
                arr = np.asarray(lat)
                r = PhaseResult(
                    policy, rnd, sent, len(lat), errors,
                    float(np.percentile(arr, 50)), float(np.percentile(arr, 99)),
                    float(arr.mean()),
                )  # fmt: skip
                results.append(r)
                print(
                    f"  round {rnd} {policy:22s} p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms"
                    f"  errors {errors}",
                    flush=True,
                )
        ratios = []
        for rnd in range(a.rounds):
            by = {r.policy: r for r in results if r.round == rnd}
            ratios.append(by[POLICIES[0]].p99_ms / by[POLICIES[1]].p99_ms)
        summary: dict[str, object] = {
            "p99_ratio_default_over_wrr_median": statistics.median(ratios),
            "p99_ratio_per_round": ratios,
            "p99_ms_default_median": statistics.median(
                r.p99_ms for r in results if r.policy == POLICIES[0]
            ),
            "p99_ms_wrr_median": statistics.median(
                r.p99_ms for r in results if r.policy == POLICIES[1]
            ),
            "phases": [asdict(r) for r in results],
            "config": vars(a),
        }
        return summary
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except TimeoutError:
                p.kill()
                await p.wait()
        await etcd.stop()


def simulated(a: argparse.Namespace) -> dict[str, float]:
    """The same cell in the discrete-event model (bench.fleet), same policy code:
    speeds, slots, load and size distribution as the live run; fresh reports."""
    from bench.fleet import make_workload, simulate
    from gateway.scheduler import build_policy

    out: dict[str, float] = {}
    for policy in POLICIES:
        p99s = []
        for seed in (1, 2, 3):
            work = make_workload(seed, 20_000, f"lognormal{a.sigma}", len(SPEEDS))
            sojourn = simulate(
                SPEEDS, SLOTS, a.load, 1.0, work, lambda p=policy: build_policy(p), seed=seed
            )
            p99s.append(float(np.percentile(sojourn, 99)) * a.mean_ms)
        out[policy] = statistics.median(p99s)
    out["ratio"] = out[POLICIES[0]] / out[POLICIES[1]]
    return out


def plot(summary: dict[str, object], path: Path, sim: dict[str, float] | None) -> None:
    """p50 and p99 per policy and round (bars), with the simulated p99 (dashed lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = summary["phases"]
    assert isinstance(phases, list)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--load", type=float, default=0.85)
    ap.add_argument("--mean-ms", type=float, default=40.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/live.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/live.png"))
    ap.add_argument("--from-json", type=Path, help="re-plot a saved run (no measurement)")
    a = ap.parse_args()
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        sim_saved = saved.get("simulation") or simulated(a)
        plot(saved, a.plot, sim_saved)
        print(f"wrote {a.plot}")
        return
    if a.quick:
        a.rounds, a.seconds, a.warmup = 1, 8.0, 2.0
    try:
        import uvloop

        summary = uvloop.run(main_async(a))
    except ImportError:
        summary = asyncio.run(main_async(a))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=2, default=str))
    ratio = float(summary["p99_ratio_default_over_wrr_median"])  # type: ignore[arg-type]
    verdict = "PASS" if ratio <= 0.6 else "MISS"
    print(f"p99 latency_capacity / weighted_round_robin = {ratio:.2f} (target <= 0.6): {verdict}")
    sim = simulated(a)
    summary["simulation"] = sim
    a.out.write_text(json.dumps(summary, indent=2, default=str))
    plot(summary, a.plot, sim)
    off = ratio / sim["ratio"]
    verdict = "PASS" if 0.75 <= off <= 1.25 else "MISS"
    print(
        f"simulation of this cell: p99 {sim[POLICIES[0]]:.0f} ms vs {sim[POLICIES[1]]:.0f} ms, "
        f"ratio {sim['ratio']:.2f}; live / simulated ratio = {off:.2f} "
        f"(target within 25%): {verdict}"
    )


if __name__ == "__main__":
    main()
