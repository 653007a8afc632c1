"""Gateway overhead on unary Infer: added latency, throughput ceiling, CPU per request.

The worker is the FakeBackend (simulated service time, no model): one `echo` Infer model
(one small FP32 tensor in, the same tensor out) with per_request_ms=5 fixed, 256 slots,
worker capacity 1024. Etcd, worker, gateway, bare proxy (bench/proxy.py) and the load
generator (grpc.aio on uvloop) are separate processes on 127.0.0.1.

(a) latency: open-loop Poisson arrivals at half the direct capacity (measured first,
    closed loop), direct-to-worker vs through the gateway, same arrival schedule.
(b) ceiling: per-request work 0 ms (the `fake_work_ms` input), closed loop at high
    concurrency through the gateway vs through the bare proxy, same worker; CPU per
    request of the hop = its utime+stime delta over the window / requests in the window.

Arms alternate (A B A B ...) within one run; each statistic is the median over trials.

    python -m bench.gateway_overhead            # full (about 3 minutes)
    python -m bench.gateway_overhead --quick    # about 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.procs import (
    LoadGen,
    Mesh,
    Pinning,
    Target,
    cpu_at_edges,
    finish_report,
    machine,
    median,
    percentile,
    pinning,
)
from meshserve.grpc_server import CHANNEL_OPTIONS
from meshserve.v1 import inference_pb2

INFER = "/meshserve.v1.Inference/Infer"
MODEL = "echo"
PER_REQUEST_MS = 5.0
SLOTS = 256
CAPACITY = 1024
JOB = "bench.gateway_overhead"


def infer_payload(work_ms: float | None) -> bytes:
    """One small FP32 tensor; with `work_ms`, it is the FakeBackend's `fake_work_ms`
    input, which overrides per_request_ms for this call (0: no simulated work)."""
    if work_ms is None:
        tensor = inference_pb2.Tensor(
            name="x",
            dtype=inference_pb2.DATA_TYPE_FP32,
            shape=[4],
            raw_contents=np.arange(4, dtype="<f4").tobytes(),
        )
    else:
        tensor = inference_pb2.Tensor(
            name="fake_work_ms",
            dtype=inference_pb2.DATA_TYPE_FP32,
            shape=[1],
            raw_contents=np.float32(work_ms).tobytes(),
        )
    return inference_pb2.InferRequest(model=MODEL, inputs=[tensor]).SerializeToString()


# -- load generator jobs (run in the LoadGen process) ------------------------------------


async def _warm(call: grpc.aio.UnaryUnaryMultiCallable, payload: bytes, n: int) -> None:
    for _ in range(n):
        await call(payload, timeout=10)


async def closed_loop(job: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` callers back to back for warmup + window seconds; throughput and
    CPU are counted between two /proc snapshots taken at the window's edges."""
    payload: bytes = job["payload"]
    pids: list[int] = job["cpu_pids"]
    max_requests: int = job["max_requests"]
    async with grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(INFER)
        await _warm(call, payload, 20)
        ends: list[float] = []
        lat: list[float] = []
        codes: dict[str, int] = {}
        sent = 0
        start = time.perf_counter()
        w0, w1 = start + job["warmup_s"], start + job["warmup_s"] + job["window_s"]
        marks: list[tuple[float, dict[int, float]]] = []

        async def caller() -> None:
            nonlocal sent
            while sent < max_requests:
                t = time.perf_counter()
                if t >= w1:
                    return
                sent += 1
                try:
                    await call(payload, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                    continue
                e = time.perf_counter()
                ends.append(e)
                if t >= w0:
                    lat.append(e - t)

        await asyncio.gather(
            cpu_at_edges(pids, (w0, w1), marks), *(caller() for _ in range(job["concurrency"]))
        )
    (t0, c0), (t1, c1) = marks
    done = sum(1 for e in ends if t0 <= e < t1)
    return {
        "requests": done,
        "seconds": t1 - t0,
        "rps": done / (t1 - t0),
        "errors": sum(codes.values()),
        "error_codes": codes,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "cpu_s": {str(pid): c1[pid] - c0[pid] for pid in pids},
    }


def poisson_schedule(seed: int, rate: float, seconds: float) -> list[float]:
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(t)


async def open_loop(job: dict[str, Any]) -> dict[str, Any]:
    """Poisson arrivals from a seeded schedule (the same for every arm of a trial).
    Latency runs from the moment a call is issued; `late` is how far issue times
    slipped behind the schedule (the client keeping up is a precondition)."""
    payload: bytes = job["payload"]
    schedule = poisson_schedule(job["seed"], job["rate"], job["warmup_s"] + job["window_s"])
    async with grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(INFER)
        await _warm(call, payload, 20)
        lat: list[float] = []
        late: list[float] = []
        codes: dict[str, int] = {}
        details: dict[str, str] = {}  # one example per status code
        warmup = job["warmup_s"]

        async def one(offset: float, issued: float) -> None:
            try:
                await call(payload, timeout=10)
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                details.setdefault(exc.code().name, exc.details() or "")
                return
            if offset >= warmup:
                lat.append(time.perf_counter() - issued)

        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        i = 0
        while i < len(schedule):
            now = time.perf_counter()
            # Issue everything due (timers tick in ms: several arrivals may share one).
            while i < len(schedule) and start + schedule[i] <= now:
                if schedule[i] >= warmup:
                    late.append(now - start - schedule[i])
                tasks.append(asyncio.create_task(one(schedule[i], now)))
                i += 1
            if i < len(schedule):
                await asyncio.sleep(max(0.0, start + schedule[i] - time.perf_counter()))
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return {
        "requests": len(lat),
        "errors": sum(codes.values()),
        "error_codes": codes,
        "error_details": details,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p90_ms": percentile(lat, 90) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "mean_ms": float(np.mean(lat)) * 1e3 if lat else float("nan"),
        "late_p99_ms": percentile(late, 99) * 1e3,
    }


# -- orchestration -----------------------------------------------------------------------


async def _infer_probe(channel: grpc.aio.Channel) -> object:
    return await channel.unary_unary(INFER)(infer_payload(0.0), timeout=5)


async def _latency_phase(
    loadgen: LoadGen,
    mesh: Mesh,
    arms: dict[str, str],
    rate: float,
    label: str,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Open-loop trials, arms alternating; the same arrival schedule for both arms."""
    rows: list[dict[str, Any]] = []
    for t in range(args.trials):
        row: dict[str, Any] = {"trial": t, "rate_rps": rate}
        for arm, target in arms.items():
            row[arm] = await loadgen.run(
                f"{JOB}:open_loop",
                {
                    "target": target,
                    "payload": infer_payload(None),
                    "rate": rate,
                    "seed": 1000 + t,
                    "warmup_s": args.warmup,
                    "window_s": args.window,
                },
                args.warmup + args.window + 60,
            )
            mesh.check_alive()
        d, g = row["direct"], row["gateway"]
        row["added_p50_ms"] = g["p50_ms"] - d["p50_ms"]
        row["added_p99_ms"] = g["p99_ms"] - d["p99_ms"]
        rows.append(row)
        print(
            f"  {label} load trial {t}: direct p50 {d['p50_ms']:.2f} p99 {d['p99_ms']:.2f} ms | "
            f"gateway p50 {g['p50_ms']:.2f} p99 {g['p99_ms']:.2f} ms | added p50 "
            f"{row['added_p50_ms']:+.2f} p99 {row['added_p99_ms']:+.2f} ms "
            f"(errors {d['error_codes'] or 0}/{g['error_codes'] or 0}, client late p99 "
            f"{d['late_p99_ms']:.2f}/{g['late_p99_ms']:.2f} ms)",
            flush=True,
        )
    return rows


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load0 = os.getloadavg()
    pin: Pinning = pinning(args.pin)
    trials = args.trials
    window, warmup = args.window, args.warmup
    log_dir = Path(tempfile.mkdtemp(prefix="meshserve-bench-overhead-"))
    mesh = Mesh(log_dir)
    loadgen = LoadGen(pin.client)
    try:
        etcd = await mesh.start_etcd(pin.etcd)
        worker, gateway, proxy = await mesh.start_worker_and_hops(
            etcd,
            pin,
            models=[f"{MODEL}:infer"],
            options={
                "per_request_ms": str(PER_REQUEST_MS),
                "distribution": "fixed",
                "slots": str(SLOTS),
                "max_queue": "4096",
            },
            capacity=CAPACITY,
            probe=_infer_probe,
        )
        print(
            f"FakeBackend worker (simulated service time): {MODEL} per_request_ms="
            f"{PER_REQUEST_MS:g} fixed, slots={SLOTS}, capacity={CAPACITY}; pinning: "
            f"{pin.describe()}; {trials} trials, {window:g} s windows",
            flush=True,
        )
        timeout = warmup + window + 60

        # (a) direct capacity, then latency at half of it.
        slow = infer_payload(None)
        caps = []
        for t in range(trials):
            r = await loadgen.run(
                f"{JOB}:closed_loop",
                {
                    "target": worker.address,
                    "payload": slow,
                    "concurrency": args.capacity_concurrency,
                    "warmup_s": warmup,
                    "window_s": args.capacity_window,
                    "cpu_pids": [worker.pid],
                    "max_requests": 2_000_000,
                },
                timeout,
            )
            caps.append(r["rps"])
            print(f"  capacity trial {t}: direct {r['rps']:.0f} req/s (errors {r['errors']})")
        capacity = median(caps)
        rate = capacity / 2
        light = capacity * args.light_fraction
        print(
            f"direct capacity {capacity:.0f} req/s -> open-loop Poisson at {rate:.0f} req/s "
            f"(and {light:.0f} req/s, light-load reference)",
            flush=True,
        )
        arms = {"direct": worker.address, "gateway": gateway.address}
        lat_trials = await _latency_phase(loadgen, mesh, arms, rate, "half", args)
        light_trials = await _latency_phase(loadgen, mesh, arms, light, "light", args)

        # (b) throughput ceiling and CPU per request: gateway vs bare proxy (+ direct).
        fast = infer_payload(0.0)
        tp_trials: list[dict[str, Any]] = []
        for t in range(trials):
            row: dict[str, Any] = {"trial": t}
            for arm, hop in (("gateway", gateway), ("proxy", proxy)):
                r = await loadgen.run(
                    f"{JOB}:closed_loop",
                    {
                        "target": hop.address,
                        "payload": fast,
                        "concurrency": args.concurrency,
                        "warmup_s": warmup,
                        "window_s": window,
                        "cpu_pids": [hop.pid, worker.pid, loadgen.pid],
                        "max_requests": 2_000_000,
                    },
                    timeout,
                )
                mesh.check_alive()
                cpu = r.pop("cpu_s")
                r["hop_cpu_us_per_req"] = cpu[str(hop.pid)] / r["requests"] * 1e6
                r["worker_cpu_us_per_req"] = cpu[str(worker.pid)] / r["requests"] * 1e6
                r["client_cpu_us_per_req"] = cpu[str(loadgen.pid)] / r["requests"] * 1e6
                row[arm] = r
            g, p = row["gateway"], row["proxy"]
            row["rps_ratio"] = g["rps"] / p["rps"]
            row["cpu_ratio"] = g["hop_cpu_us_per_req"] / p["hop_cpu_us_per_req"]
            tp_trials.append(row)
            print(
                f"  ceiling trial {t}: gateway {g['rps']:.0f} req/s "
                f"{g['hop_cpu_us_per_req']:.0f} us CPU/req | proxy {p['rps']:.0f} req/s "
                f"{p['hop_cpu_us_per_req']:.0f} us CPU/req | ratio rps "
                f"{row['rps_ratio']:.3f} cpu {row['cpu_ratio']:.3f} "
                f"(worker {g['worker_cpu_us_per_req']:.0f}/{p['worker_cpu_us_per_req']:.0f}, "
                f"client {g['client_cpu_us_per_req']:.0f}/{p['client_cpu_us_per_req']:.0f} "
                f"us/req; errors {g['errors']}/{p['errors']})",
                flush=True,
            )
    finally:
        loadgen.close()
        await mesh.close()

    def med(rows: list[dict[str, Any]], *path: str) -> float:
        vals = []
        for r in rows:
            v: Any = r
            for k in path:
                v = v[k]
            vals.append(float(v))
        return median(vals)

    targets = [
        Target("added p50 latency (gateway - direct)", med(lat_trials, "added_p50_ms"), 0.5,
               "ms", False),
        Target("added p99 latency (gateway - direct)", med(lat_trials, "added_p99_ms"), 2.0,
               "ms", False),
        Target("throughput gateway / proxy", med(tp_trials, "rps_ratio"), 0.9, "x", True),
        Target("CPU per request gateway / proxy", med(tp_trials, "cpu_ratio"), 1.1, "x", False),
    ]  # fmt: skip

    def latency(rows: list[dict[str, Any]], rate_rps: float) -> dict[str, Any]:
        return {
            "rate_rps": rate_rps,
            **{
                f"{arm}_{q}_ms": med(rows, arm, f"{q}_ms")
                for arm in ("direct", "gateway")
                for q in ("p50", "p99")
            },
            "added_p50_ms": med(rows, "added_p50_ms"),
            "added_p99_ms": med(rows, "added_p99_ms"),
        }

    summary = {
        "direct_capacity_rps": capacity,
        "latency_half_capacity": latency(lat_trials, rate),
        "latency_light_load": latency(light_trials, light),
        "ceiling_rps": {arm: med(tp_trials, arm, "rps") for arm in ("gateway", "proxy")},
        "hop_cpu_us_per_req": {
            arm: med(tp_trials, arm, "hop_cpu_us_per_req") for arm in ("gateway", "proxy")
        },
        "rps_ratio": med(tp_trials, "rps_ratio"),
        "cpu_ratio": med(tp_trials, "cpu_ratio"),
    }
    return {
        "benchmark": "gateway_overhead",
        "backend": "FakeBackend (simulated service time, no model)",
        "quick": args.quick,
        "config": {
            "model": MODEL,
            "per_request_ms": PER_REQUEST_MS,
            "slots": SLOTS,
            "capacity": CAPACITY,
            "trials": trials,
            "window_s": window,
            "warmup_s": warmup,
            "concurrency": args.concurrency,
            "capacity_concurrency": args.capacity_concurrency,
            "light_fraction": args.light_fraction,
            "pinning": pin.as_dict(),
        },
        "machine": machine(load0),
        "summary": summary,
        "targets": [t.as_dict() for t in targets],
        "capacity_trials_rps": caps,
        "latency_trials": lat_trials,
        "light_latency_trials": light_trials,
        "ceiling_trials": tp_trials,
        "_targets": targets,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gateway_overhead", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter trials")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--window", type=float, default=5.0, help="seconds measured per arm")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    ap.add_argument("--capacity-window", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=128, help="closed-loop callers (b)")
    ap.add_argument("--capacity-concurrency", type=int, default=256)
    ap.add_argument(
        "--light-fraction",
        type=float,
        default=0.1,
        help="light-load reference rate, as a fraction of the direct capacity",
    )
    ap.add_argument("--pin", choices=("none", "split"), default="none")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.trials, args.window, args.warmup, args.capacity_window = 3, 2.0, 0.5, 2.0
    import uvloop

    result = uvloop.run(run(args))
    targets: list[Target] = result.pop("_targets")
    s = result["summary"]
    print()
    print("FakeBackend worker (simulated service time); medians over trials:")
    for key, name in (("latency_half_capacity", "half capacity"), ("latency_light_load", "light")):
        lat = s[key]
        print(
            f"  {name} load, {lat['rate_rps']:.0f} req/s: p50 direct {lat['direct_p50_ms']:.2f} "
            f"ms, gateway {lat['gateway_p50_ms']:.2f} ms; p99 direct {lat['direct_p99_ms']:.2f} "
            f"ms, gateway {lat['gateway_p99_ms']:.2f} ms; added p50 {lat['added_p50_ms']:+.2f} "
            f"ms, p99 {lat['added_p99_ms']:+.2f} ms"
        )
    print(
        f"  ceiling: gateway {s['ceiling_rps']['gateway']:.0f} req/s, proxy "
        f"{s['ceiling_rps']['proxy']:.0f} req/s (ratio {s['rps_ratio']:.3f}); hop CPU/req "
        f"gateway {s['hop_cpu_us_per_req']['gateway']:.0f} us, proxy "
        f"{s['hop_cpu_us_per_req']['proxy']:.0f} us (ratio {s['cpu_ratio']:.3f})"
    )
    finish_report(result, targets, args.out, "gateway_overhead", args.quick)


if __name__ == "__main__":
    main()
