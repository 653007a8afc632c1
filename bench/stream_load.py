"""Generate-stream load for the streaming benchmarks: the payload, and the load
generator's job (closed loop of streams, per-message timing), run in a LoadGen process.

Tokens are counted from `token_ids` of the messages the client receives. The gap of a
token is the time since the previous message of its stream divided by the tokens in its
message (a message carrying k tokens after g ms counts k gaps of g/k: the stream's rate,
without crediting coalescing with zero gaps). CPU per token = the process's utime+stime
delta over the window / tokens received in the window.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any

import grpc
import numpy as np

from bench.cpu import cpu_at_edges
from bench.stats import percentile, weighted_percentile
from meshserve.grpc_server import CHANNEL_OPTIONS
from meshserve.v1 import inference_pb2

GENERATE = "/meshserve.v1.Inference/Generate"
MODEL = "stream"


def generate_payload(max_tokens: int) -> bytes:
    return inference_pb2.GenerateRequest(
        model=MODEL,
        prompt="the quick brown fox",
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, seed=7),
    ).SerializeToString()


async def streams(job: dict[str, Any]) -> dict[str, Any]:
    payload: bytes = job["payload"]
    pids: list[int] = job["cpu_pids"]
    concurrency: int = job["concurrency"]
    max_streams: int = job["max_streams"]
    parse = inference_pb2.GenerateResponse.FromString
    # Per message: receive time, tokens carried, gap since the stream's previous message
    # (NaN for a stream's first message). Per stream: issue time, time to first token.
    msg_t, msg_n, msg_gap = array("d"), array("l"), array("d")
    issued, ttft = array("d"), array("d")
    errors = 0
    started = 0
    async with grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) as channel:
        gen = channel.unary_stream(GENERATE)
        async for _ in gen(generate_payload(2), timeout=10):  # connect, warm the path
            pass
        start = time.perf_counter()
        w0, w1 = start + job["warmup_s"], start + job["warmup_s"] + job["window_s"]
        marks: list[tuple[float, dict[int, float]]] = []

        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            prev = float("nan")
            try:
                async for raw in gen(payload, timeout=60):
                    t = time.perf_counter()
                    n = len(parse(raw).token_ids)
                    if prev != prev:  # first message
                        issued.append(t0)
                        ttft.append(t - t0)
                    msg_t.append(t)
                    msg_n.append(n)
                    msg_gap.append(t - prev)
                    prev = t
            except grpc.aio.AioRpcError:
                errors += 1

        async def client(i: int) -> None:
            nonlocal started
            # Stagger starts over one stream's length so streams do not tick in lockstep.
            await asyncio.sleep(job["stagger_s"] * i / concurrency)
            while time.perf_counter() < w1 and started < max_streams:
                started += 1
                await one()

        await asyncio.wait_for(
            asyncio.gather(
                cpu_at_edges(pids, (w0, w1), marks), *(client(i) for i in range(concurrency))
            ),
            job["warmup_s"] + job["window_s"] + 120,
        )
    (c0_t, c0), (c1_t, c1) = marks
    t = np.frombuffer(msg_t, dtype=np.float64)
    n = np.frombuffer(msg_n, dtype=np.int64)
    gap = np.frombuffer(msg_gap, dtype=np.float64)
    inside = (t >= c0_t) & (t < c1_t)
    tokens = int(n[inside].sum())
    msgs = int(inside.sum())
    has_gap = inside & ~np.isnan(gap) & (n > 0)
    per_token_gap = gap[has_gap] / n[has_gap]
    iss = np.frombuffer(issued, dtype=np.float64)
    first = np.frombuffer(ttft, dtype=np.float64)[(iss >= c0_t) & (iss < c1_t)]
    seconds = c1_t - c0_t
    cpu = {str(pid): c1[pid] - c0[pid] for pid in pids}
    return {
        "seconds": seconds,
        "streams": started,
        "errors": errors,
        "tokens": tokens,
        "messages": msgs,
        "tokens_per_s": tokens / seconds,
        "messages_per_token": msgs / tokens if tokens else float("nan"),
        "ttft_p50_ms": percentile(first, 50) * 1e3,
        "ttft_p99_ms": percentile(first, 99) * 1e3,
        "gap_p50_ms": weighted_percentile(per_token_gap, n[has_gap], 50) * 1e3,
        "gap_p99_ms": weighted_percentile(per_token_gap, n[has_gap], 99) * 1e3,
        "msg_gap_p50_ms": percentile(gap[has_gap], 50) * 1e3,
        "cpu_us_per_token": {pid: s / tokens * 1e6 if tokens else float("nan")
                             for pid, s in cpu.items()},
        "cpu_s": cpu,
    }  # fmt: skip


async def generate_probe(channel: grpc.aio.Channel) -> object:
    """One real one-token stream: the process serves (and a gateway routes)."""
    async for _ in channel.unary_stream(GENERATE)(generate_payload(1), timeout=5):
        pass
    return None
