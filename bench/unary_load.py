"""Unary Infer load for the hop benchmarks: payloads, and the load generator's jobs
(closed loop and open-loop Poisson arrivals), run in a LoadGen process.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import numpy as np

from bench.cpu import cpu_at_edges
from bench.stats import percentile
from meshserve.grpc_server import CHANNEL_OPTIONS
from meshserve.v1 import inference_pb2

INFER = "/meshserve.v1.Inference/Infer"
MODEL = "echo"


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
    slipped behind the schedule (the client keeping up is a precondition). With
    `cpu_pids`, also their CPU seconds over the window (after the warm-up)."""
    payload: bytes = job["payload"]
    pids: list[int] = job.get("cpu_pids", [])
    marks: list[tuple[float, dict[int, float]]] = []
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
        if pids:
            edges = (start + warmup, start + warmup + job["window_s"])
            tasks.append(asyncio.create_task(cpu_at_edges(pids, edges, marks)))
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
    cpu = {}
    if marks:
        (_, c0), (_, c1) = marks
        cpu = {str(pid): c1[pid] - c0[pid] for pid in pids}
    return {
        "cpu_s": cpu,
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


async def infer_probe(channel: grpc.aio.Channel) -> object:
    """One real Infer with no simulated work: the process serves (and a gateway routes)."""
    return await channel.unary_unary(INFER)(infer_payload(0.0), timeout=5)
