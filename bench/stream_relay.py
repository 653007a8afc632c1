"""Streaming relay: what the gateway adds to Generate streams, and what it costs per token.

The worker is the FakeBackend (simulated timing, no model): model `stream` emits one
token every 2 ms (per_token_ms=2) after per_request_ms=1, max_tokens=200 per stream,
512 slots, worker capacity 1024. Closed loop: N client tasks each run streams back to
back (starts staggered over one stream's length), at 8 streams (light-load reference),
64 and 256. Arms: direct to the worker, through the gateway, and (at 8 and 64 streams,
for reference) through the bare proxy bench/proxy.py, which relays every message as it
comes. Arms alternate (A B C A B C ...) within one run; each statistic is the median
over trials.

Tokens are counted from `token_ids` of the messages the client receives. The gap of a
token is the time since the previous message of its stream divided by the tokens in its
message (a message carrying k tokens after g ms counts k gaps of g/k: the stream's rate,
without crediting coalescing with zero gaps). CPU per token = the process's utime+stime
delta over the window / tokens received in the window.

    python -m bench.stream_relay            # full (about 2 minutes)
    python -m bench.stream_relay --quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.cpu import Pinning, cpu_at_edges, pinning
from bench.loadgen import LoadGen
from bench.procs import Mesh
from bench.report import Target, finish, machine, results_path
from bench.stats import median, median_at, percentile, weighted_percentile
from meshserve.grpc_server import CHANNEL_OPTIONS
from meshserve.v1 import inference_pb2

GENERATE = "/meshserve.v1.Inference/Generate"
MODEL = "stream"
PER_TOKEN_MS = 2.0
PER_REQUEST_MS = 1.0
MAX_TOKENS = 200
SLOTS = 512
CAPACITY = 1024
JOB = "bench.stream_relay"


def generate_payload(max_tokens: int) -> bytes:
    return inference_pb2.GenerateRequest(
        model=MODEL,
        prompt="the quick brown fox",
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, seed=7),
    ).SerializeToString()


# -- load generator job (runs in the LoadGen process) ----------------------------------


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


# -- orchestration -----------------------------------------------------------------------


async def _generate_probe(channel: grpc.aio.Channel) -> object:
    async for _ in channel.unary_stream(GENERATE)(generate_payload(1), timeout=5):
        pass
    return None


async def _phase(
    loadgen: LoadGen,
    mesh: Mesh,
    arms: dict[str, str],
    role_pids: dict[str, int],
    hop_pids: dict[str, int],
    concurrency: int,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    stream_s = (PER_REQUEST_MS + PER_TOKEN_MS * (MAX_TOKENS - 1)) / 1000
    rows: list[dict[str, Any]] = []
    for t in range(args.trials):
        row: dict[str, Any] = {"trial": t}
        for arm, target in arms.items():
            pids = sorted(set(role_pids.values()) | set(hop_pids.values()))
            r = await loadgen.run(
                f"{JOB}:streams",
                {
                    "target": target,
                    "payload": generate_payload(MAX_TOKENS),
                    "concurrency": concurrency,
                    "warmup_s": args.warmup,
                    "window_s": args.window,
                    "stagger_s": stream_s,
                    "cpu_pids": pids,
                    "max_streams": 200_000,
                },
                args.warmup + args.window + 180,
            )
            mesh.check_alive()
            per_token = r.pop("cpu_us_per_token")
            r.pop("cpu_s")
            r["cpu_us_per_token"] = {role: per_token[str(pid)] for role, pid in role_pids.items()}
            if arm in hop_pids:
                r["cpu_us_per_token"]["hop"] = per_token[str(hop_pids[arm])]
                r["hop_cpu_us_per_message"] = (
                    r["cpu_us_per_token"]["hop"] * r["tokens"] / r["messages"]
                )
            row[arm] = r
            hop = r["cpu_us_per_token"].get("hop")
            print(
                f"  {concurrency:>3} streams trial {t} {arm:<8} {r['tokens_per_s']:>8.0f} tok/s "
                f"ttft p50 {r['ttft_p50_ms']:6.2f} ms  gap p50 {r['gap_p50_ms']:5.2f} ms "
                f"p99 {r['gap_p99_ms']:6.2f} ms  msg/tok {r['messages_per_token']:.3f}"
                + (f"  hop {hop:5.1f} us/tok" if hop is not None else "")
                + f"  worker {r['cpu_us_per_token']['worker']:5.1f} us/tok"
                f"  errors {r['errors']}",
                flush=True,
            )
        rows.append(row)
    return rows


def _med_diff(rows: list[dict[str, Any]], a: str, b: str, key: str) -> float:
    return median(float(r[a][key]) - float(r[b][key]) for r in rows)


def _med_ratio(rows: list[dict[str, Any]], a: str, b: str, key: str) -> float:
    return median(float(r[a][key]) / float(r[b][key]) for r in rows)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load0 = os.getloadavg()
    pin: Pinning = pinning(args.pin)
    log_dir = Path(tempfile.mkdtemp(prefix="meshserve-bench-stream-"))
    mesh = Mesh(log_dir)
    loadgen = LoadGen(pin.client)
    try:
        etcd = await mesh.start_etcd(pin.etcd)
        worker, gateway, proxy = await mesh.start_worker_and_hops(
            etcd,
            pin,
            models=[MODEL],
            options={
                "per_request_ms": str(PER_REQUEST_MS),
                "per_token_ms": str(PER_TOKEN_MS),
                "distribution": "fixed",
                "slots": str(SLOTS),
                "max_queue": "4096",
            },
            capacity=CAPACITY,
            probe=_generate_probe,
        )
        print(
            f"FakeBackend worker (simulated timing): {MODEL} per_token_ms={PER_TOKEN_MS:g}, "
            f"per_request_ms={PER_REQUEST_MS:g}, max_tokens={MAX_TOKENS}, slots={SLOTS}, "
            f"capacity={CAPACITY}; pinning: {pin.describe()}; {args.trials} trials, "
            f"{args.window:g} s windows",
            flush=True,
        )
        roles = {"worker": worker.pid, "client": loadgen.pid}
        hops = {"gateway": gateway.pid, "proxy": proxy.pid}
        arms_ref = {"direct": worker.address, "gateway": gateway.address}
        if not args.no_proxy:
            arms_ref["proxy"] = proxy.address
        rows_light = await _phase(loadgen, mesh, arms_ref, roles, hops, args.streams_light, args)
        arms64 = arms_ref
        rows64 = await _phase(loadgen, mesh, arms64, roles, hops, args.streams, args)
        rows256 = await _phase(
            loadgen,
            mesh,
            {"direct": worker.address, "gateway": gateway.address},
            roles,
            hops,
            args.streams_high,
            args,
        )
    finally:
        loadgen.close()
        await mesh.close()

    n, hi, lo = args.streams, args.streams_high, args.streams_light
    targets = [
        Target(f"added TTFT p50 @{n} (gateway - direct)",
               _med_diff(rows64, "gateway", "direct", "ttft_p50_ms"), 1.0, "ms", False),
        Target(f"added token gap p50 @{n} (gateway - direct)",
               _med_diff(rows64, "gateway", "direct", "gap_p50_ms"), 0.2, "ms", False),
        Target(f"gateway CPU per relayed token @{n}",
               median_at(rows64, "gateway", "cpu_us_per_token", "hop"), 40.0, "us", False),
        Target(f"relayed tokens/s @{hi} gateway / direct",
               _med_ratio(rows256, "gateway", "direct", "tokens_per_s"), 0.97, "x", True),
    ]  # fmt: skip
    summary: dict[str, Any] = {}
    for label, rows in ((str(lo), rows_light), (str(n), rows64), (str(hi), rows256)):
        arms = [a for a in ("direct", "gateway", "proxy") if a in rows[0]]
        summary[label] = {
            arm: {
                key: median_at(rows, arm, key)
                for key in (
                    "tokens_per_s",
                    "ttft_p50_ms",
                    "ttft_p99_ms",
                    "gap_p50_ms",
                    "gap_p99_ms",
                    "msg_gap_p50_ms",
                    "messages_per_token",
                )
            }
            | {
                f"{role}_cpu_us_per_token": median_at(rows, arm, "cpu_us_per_token", role)
                for role in rows[0][arm]["cpu_us_per_token"]
            }
            for arm in arms
        }
    return {
        "benchmark": "stream_relay",
        "backend": "FakeBackend (simulated timing, no model)",
        "quick": args.quick,
        "config": {
            "model": MODEL,
            "per_token_ms": PER_TOKEN_MS,
            "per_request_ms": PER_REQUEST_MS,
            "max_tokens": MAX_TOKENS,
            "slots": SLOTS,
            "capacity": CAPACITY,
            "streams": n,
            "streams_high": hi,
            "streams_light": lo,
            "trials": args.trials,
            "window_s": args.window,
            "warmup_s": args.warmup,
            "pinning": pin.as_dict(),
        },
        "machine": machine(load0),
        "summary": summary,
        f"trials_{lo}": rows_light,
        f"trials_{n}": rows64,
        f"trials_{hi}": rows256,
        "_targets": targets,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_relay", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter trials")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--window", type=float, default=4.0, help="seconds measured per arm")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--streams-high", type=int, default=256)
    ap.add_argument(
        "--streams-light", type=int, default=8, help="light-load reference (no targets)"
    )
    ap.add_argument("--no-proxy", action="store_true", help="skip the bare-proxy reference")
    ap.add_argument("--pin", choices=("none", "split"), default="none")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.trials, args.window, args.warmup = 3, 2.0, 0.6
    import uvloop

    result = uvloop.run(run(args))
    targets: list[Target] = result.pop("_targets")
    name = "stream_relay.quick" if args.quick else "stream_relay"
    print()
    print("FakeBackend worker (simulated timing); medians over trials:")
    for label, arms in result["summary"].items():
        for arm, s in arms.items():
            hop = s.get("hop_cpu_us_per_token")
            print(
                f"  {label:>3} streams {arm:<8} {s['tokens_per_s']:>8.0f} tok/s  ttft p50 "
                f"{s['ttft_p50_ms']:.2f} ms  gap p50 {s['gap_p50_ms']:.3f} ms  msg/tok "
                f"{s['messages_per_token']:.3f}"
                + (f"  hop CPU {hop:.1f} us/tok" if hop is not None else "")
            )
    finish(result, targets, results_path(args.out, name))


if __name__ == "__main__":
    main()
