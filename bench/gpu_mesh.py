"""The mesh side of the GPU check: etcd, a gateway and one worker serving the model
(subprocesses, as `python -m meshserve ...`), and rounds of N concurrent streams sent by
load-generator processes (bench.loadgen.LoadGen), to the worker directly or through the
gateway.

A round starts N streams at once (prompts as token ids, greedy, ignore_eos, max_tokens
each) and records, per stream, when it was issued, when its first and last tokens came
and the per-token gaps (a message carrying k tokens after g ms counts k gaps of g/k).
ms/step of a stream = (last - first) / (tokens - 1); a round's tokens/s = its tokens /
(last token of any stream - first issue).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format

from bench.loadgen import LoadGen
from bench.procs import Mesh
from bench.stats import median, percentile
from meshserve.grpc_server import CHANNEL_OPTIONS
from meshserve.launch import Child, wait_until_serving
from meshserve.v1 import inference_pb2, inference_pb2_grpc

GENERATE = "/meshserve.v1.Inference/Generate"
JOB = "bench.gpu_mesh:streams_job"


def request_bytes(model: str, prompt: Sequence[int], max_tokens: int) -> bytes:
    return inference_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=list(prompt),
        sampling=inference_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, seed=1
        ),
    ).SerializeToString()


# -- processes ----------------------------------------------------------------------------


@dataclass
class MeshProcs:
    mesh: Mesh
    worker: Child
    gateway: Child

    def kill_now(self) -> None:
        """Synchronous SIGKILL of everything (the time guard's last resort)."""
        self.mesh.kill_now()


async def start_mesh(log_dir: Path, models_dir: Path, model: str, device: str) -> MeshProcs:
    """etcd (waits until healthy), then a worker and a gateway (not waited for)."""
    mesh = Mesh(log_dir)
    etcd = await mesh.start_etcd()
    args = ["--device", device, "--models-dir", str(models_dir), "--model", model]
    worker = mesh.worker(etcd, [*args, "--capacity", "64"], worker_id="gpu-check-worker",
                         log_level="info")  # fmt: skip
    return MeshProcs(mesh, worker, mesh.gateway(etcd))


async def wait_serving(proc: Child, model: str, timeout_s: float) -> None:
    """Until one real Generate of `model` succeeds at `proc` (worker or gateway)."""
    payload = request_bytes(model, [5, 6, 7], 1)

    async def probe(channel: grpc.aio.Channel) -> object:
        async for _ in channel.unary_stream(GENERATE)(payload, timeout=30):
            pass
        return None

    await asyncio.wait_for(wait_until_serving(proc, probe, timeout_s), timeout_s + 10)


async def describe_models(address: str) -> str:
    """ListModels of a worker, one line (engine slots, KV capacity, state)."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        resp = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    return text_format.MessageToString(resp, as_one_line=True)


# -- load generator job (runs in a LoadGen process) ---------------------------------------


async def streams_job(job: dict[str, Any]) -> dict[str, Any]:
    """Start every stream of `job["payloads"]` at `job["start_at"]` (perf_counter, the
    same clock in every process on Linux); cut them at `job["stop_at"]`."""
    parse = inference_pb2.GenerateResponse.FromString
    stop_at: float = job["stop_at"]
    async with grpc.aio.insecure_channel(job["target"], options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        gen = channel.unary_stream(GENERATE)

        async def one(payload: bytes) -> dict[str, Any]:
            gaps: list[float] = []
            rec: dict[str, Any] = {
                "issue": time.perf_counter(),
                "first": math.nan,
                "last": math.nan,
                "tokens": 0,
                "gaps": gaps,
                "error": "",
            }
            prev = math.nan
            try:
                call = gen(payload, timeout=max(0.5, stop_at - time.perf_counter()))
                async for raw in call:
                    t = time.perf_counter()
                    n = len(parse(raw).token_ids)
                    if n == 0:
                        continue
                    if rec["tokens"] == 0:
                        rec["first"] = t
                    else:
                        gaps.extend([(t - prev) / n] * n)
                    prev = rec["last"] = t
                    rec["tokens"] += n
            except grpc.aio.AioRpcError as exc:
                rec["error"] = f"{exc.code().name}: {exc.details()}"
            return rec

        await asyncio.sleep(max(0.0, job["start_at"] - time.perf_counter()))
        recs = await asyncio.gather(*(one(p) for p in job["payloads"]))
    return {"streams": list(recs)}


# -- rounds and their statistics ----------------------------------------------------------


def summarize(recs: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    ok = [r for r in recs if r["tokens"] > 0]
    tokens = sum(int(r["tokens"]) for r in recs)
    per_stream = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    gaps = [g for r in ok for g in r["gaps"]]
    ttft = [r["first"] - r["issue"] for r in ok]
    wall = max((r["last"] for r in ok), default=math.nan) - min(r["issue"] for r in recs)
    errors = sorted({r["error"] for r in recs if r["error"]})
    return {
        "streams": len(recs),
        "complete": sum(1 for r in recs if r["tokens"] >= max_tokens),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "ms_per_step": median(per_stream) * 1e3,
        "gap_p50_ms": percentile(gaps, 50) * 1e3,
        "gap_p99_ms": percentile(gaps, 99) * 1e3,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "errors": errors,
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds (only complete rounds when there are any)."""
    full = [r for r in rounds if r["complete"] == r["streams"]] or rounds
    out: dict[str, Any] = {"rounds": len(rounds), "complete_rounds": sum(
        1 for r in rounds if r["complete"] == r["streams"])}  # fmt: skip
    for key in ("ms_per_step", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms",
                "gap_p99_ms"):  # fmt: skip
        out[key] = median(float(r[key]) for r in full)  # NaN (nothing measured) left out
    out["errors"] = sorted({e for r in rounds for e in r["errors"]})
    return out


class Rounds:
    """Runs rounds through `clients` load-generator processes (streams split evenly)."""

    def __init__(self, clients: int, model: str) -> None:
        self.model = model
        self.gens = [LoadGen() for _ in range(max(1, clients))]

    def close(self) -> None:
        for g in self.gens:
            g.close()

    async def run(
        self, target: str, prompts: list[list[int]], max_tokens: int, stop_at_mono: float
    ) -> dict[str, Any]:
        payloads = [request_bytes(self.model, p, max_tokens) for p in prompts]
        gens = self.gens[: min(len(self.gens), len(payloads))]
        now = time.perf_counter()
        stop_in = max(1.0, stop_at_mono - time.monotonic())
        start_at, stop_at = now + 0.25, now + 0.25 + stop_in
        parts = [payloads[i :: len(gens)] for i in range(len(gens))]
        results = await asyncio.gather(
            *(
                g.run(JOB, {"target": target, "payloads": part, "start_at": start_at,
                            "stop_at": stop_at}, stop_in + 30)
                for g, part in zip(gens, parts, strict=True)
            )
        )  # fmt: skip
        recs = [rec for r in results for rec in r["streams"]]
        return summarize(recs, max_tokens)


async def measure(
    rounds: Rounds,
    arms: dict[str, str],
    counts: Sequence[int],
    prompts: Callable[[int, int], list[list[int]]],
    *,
    max_tokens: int,
    trials: int,
    deadline_mono: float,
    round_cap_s: float,
    log: Callable[[str], None],
    store: dict[str, dict[str, Any]],
) -> None:
    """For each stream count (in the order given): a warm-up round per arm, then up
    to `trials` rounds per arm, arms alternating; each count gets an equal share of the
    time left. Results go into `store[arm][str(count)]` as they come (partial on a cut)."""
    for i, n in enumerate(counts):
        share_end = time.monotonic() + (deadline_mono - time.monotonic()) / (len(counts) - i)
        if share_end - time.monotonic() < 3:
            log(f"mesh: {n} streams skipped (time guard)")
            continue
        for arm, target in arms.items():
            stop = min(share_end, time.monotonic() + round_cap_s)
            # Full length: the engine captures CUDA graphs per (batch, KV span) bucket lazily.
            w = await rounds.run(target, prompts(n, 1000 + n), max_tokens, stop)
            errs = f" errors: {'; '.join(w['errors'])}" if w["errors"] else ""
            done = f"{w['complete']}/{w['streams']} complete"
            log(f"mesh: {n:>2} streams {arm:<8} warm-up: {done}{errs}")
        per_arm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        for t in range(trials):
            for arm, target in arms.items():
                t0 = time.monotonic()
                stop = min(share_end, t0 + round_cap_s)
                r = await rounds.run(target, prompts(n, 2000 + 97 * t + n), max_tokens, stop)
                per_arm[arm].append(r)
                store.setdefault(arm, {})[str(n)] = combine(per_arm[arm]) | {"trials": per_arm[arm]}
                log(f"mesh: {n:>2} streams {arm:<8} trial {t}: {r['ms_per_step']:7.3f} ms/step "
                    f"{r['tokens_per_s']:9.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.2f} ms  "
                    f"{r['complete']}/{r['streams']} complete"
                    + (f"  errors: {'; '.join(r['errors'])}" if r["errors"] else ""))  # fmt: skip
                took = time.monotonic() - t0
            if share_end - time.monotonic() < 1.5 * took * len(arms):
                break
