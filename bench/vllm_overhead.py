"""vLLM backend: the engine called in-process vs the same engine behind worker + gateway.

Two arms, one model and one engine configuration:
  engine  vLLM's AsyncLLM in this process, called directly (`AsyncLLM.generate`,
          DELTA outputs): what a program embedding vLLM gets.
  mesh    a `meshserve worker` process serving the same model with the vLLM backend,
          behind a `meshserve gateway` process (real etcd, gRPC on 127.0.0.1); the
          client is this process (grpc.aio), as for the engine arm.
Each round runs c concurrent streams (1, 8, 32) that each generate --tokens tokens
(ignore_eos, greedy, a distinct 16-token prompt per stream) on one arm, then the same
on the other arm (alternate rounds swap the order; never both at once: 2 cores).
tokens/s = tokens received / wall time from the first call to the last token;
TTFT = time from a stream's call to its first token (p50 over the round's streams).
Reported: per concurrency, the median over rounds of mesh/engine tokens/s and of
mesh - engine TTFT p50.

Run from the vLLM environment (make setup-vllm):
    .venv-vllm/bin/python -m bench.vllm_overhead            # about 3 minutes
    .venv-vllm/bin/python -m bench.vllm_overhead --quick
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypedDict

import grpc

from bench.procs import Mesh
from bench.report import Target, finish, machine, results_path
from bench.stats import median, percentile
from meshserve.grpc_server import CHANNEL_OPTIONS
from meshserve.launch import wait_until_serving
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from meshserve.vllm_demo import make_vllm_demo
from meshserve.vocab import Device
from worker.backends.vllm import VLLMBackend

MODEL = "bench-llama-vllm"
CONCURRENCY = (1, 8, 32)
PROMPT_LEN = 16


# ~15M parameters: Llama-shaped, 64-wide heads, the demo tokenizer (2205 tokens).
class Shape(TypedDict):
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


SHAPE: Shape = {
    "hidden_size": 512,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 4,
    "intermediate_size": 1408,
}
OPTIONS = {"max_model_len": "1024", "enforce_eager": "true", "dtype": "float32"}

StreamFn = Callable[[list[int], int, str], AsyncIterator[int]]


def _prompt(i: int) -> list[int]:
    return [0] + [(37 * i + 11 * j) % 2000 + 4 for j in range(PROMPT_LEN - 1)]


async def _round(stream: StreamFn, c: int, tokens: int, tag: str) -> dict[str, float]:
    """c concurrent streams; each yields the token count of every message it gets."""
    ttft: list[float] = []
    start = time.perf_counter()

    async def one(i: int) -> int:
        t0 = time.perf_counter()
        n = 0
        async for k in stream(_prompt(i), tokens, f"{tag}-{i}"):
            if n == 0 and k:
                ttft.append(time.perf_counter() - t0)
            n += k
        return n

    counts = await asyncio.gather(*(one(i) for i in range(c)))
    wall = time.perf_counter() - start
    if sum(counts) != c * tokens:
        raise RuntimeError(f"{tag}: expected {c * tokens} tokens, got {sum(counts)}")
    return {
        "tokens_per_s": sum(counts) / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p90_ms": percentile(ttft, 90) * 1000,
        "wall_s": wall,
    }


def engine_stream(engine: Any) -> StreamFn:
    # Untyped and not installed in the main environment: imported by name, as
    # worker/backends/vllm.py does.
    sampling: Any = importlib.import_module("vllm.sampling_params")
    SamplingParams, RequestOutputKind = sampling.SamplingParams, sampling.RequestOutputKind

    async def stream(prompt: list[int], tokens: int, rid: str) -> AsyncIterator[int]:
        params = SamplingParams(
            max_tokens=tokens,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        async for out in engine.generate({"prompt_token_ids": prompt}, params, rid):
            yield len(out.outputs[0].token_ids)

    return stream


def mesh_stream(stub: inference_pb2_grpc.InferenceStub) -> StreamFn:
    async def stream(prompt: list[int], tokens: int, rid: str) -> AsyncIterator[int]:
        req = inference_pb2.GenerateRequest(
            model=MODEL,
            prompt_token_ids=prompt,
            sampling=inference_pb2.SamplingParams(
                max_tokens=tokens, temperature=0.0, ignore_eos=True
            ),
        )
        async for msg in stub.Generate(req, timeout=300):
            yield len(msg.token_ids)

    return stream


async def _probe(channel: grpc.aio.Channel) -> object:
    stub = inference_pb2_grpc.InferenceStub(channel)
    req = inference_pb2.GenerateRequest(
        model=MODEL, prompt_token_ids=[0, 5], sampling=inference_pb2.SamplingParams(max_tokens=1)
    )
    async for _ in stub.Generate(req, timeout=5):
        pass
    return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load0 = os.getloadavg()
    log_dir = Path(tempfile.mkdtemp(prefix="meshserve-bench-vllm-"))
    spec = make_vllm_demo(
        log_dir / "models", name=MODEL, max_concurrency=max(CONCURRENCY), options=OPTIONS, **SHAPE
    )
    mesh = Mesh(log_dir)
    backend = VLLMBackend(spec)
    rows: dict[int, list[dict[str, Any]]] = {c: [] for c in CONCURRENCY}
    try:
        etcd = await mesh.start_etcd()
        wargs = ["--models-dir", str(log_dir / "models"), "--model", MODEL, "--capacity", "64"]
        worker = mesh.worker(etcd, wargs, worker_id="bench-vllm")
        gateway = mesh.gateway(etcd)
        await backend.load(Device("cpu"))  # meanwhile the worker starts its engine
        await wait_until_serving(worker, _probe, timeout_s=300)
        await wait_until_serving(gateway, _probe, timeout_s=60)
        print(
            f"model {MODEL} {SHAPE}, options {OPTIONS}, max_num_seqs {max(CONCURRENCY)}; "
            f"{args.rounds} rounds of {args.tokens} tokens per stream; logs in {log_dir}",
            flush=True,
        )
        async with grpc.aio.insecure_channel(gateway.address, options=CHANNEL_OPTIONS) as ch:
            arms: dict[str, StreamFn] = {
                "engine": engine_stream(backend.engine),
                "mesh": mesh_stream(inference_pb2_grpc.InferenceStub(ch)),
            }
            for c in CONCURRENCY:
                for arm, fn in arms.items():  # warm-up, not recorded
                    await _round(fn, c, min(args.tokens, 16), f"warm-{arm}-{c}")
                for r in range(args.rounds):
                    order = list(arms) if r % 2 == 0 else list(reversed(arms))
                    row: dict[str, Any] = {"round": r}
                    for arm in order:
                        row[arm] = await _round(arms[arm], c, args.tokens, f"{arm}-{c}-{r}")
                        mesh.check_alive()
                    rows[c].append(row)
                    e, m = row["engine"], row["mesh"]
                    print(
                        f"  {c:>2} streams round {r}: engine {e['tokens_per_s']:7.0f} tok/s "
                        f"TTFT p50 {e['ttft_p50_ms']:7.2f} ms | mesh {m['tokens_per_s']:7.0f} "
                        f"tok/s TTFT p50 {m['ttft_p50_ms']:7.2f} ms | ratio "
                        f"{m['tokens_per_s'] / e['tokens_per_s']:.3f}",
                        flush=True,
                    )
    finally:
        await backend.unload()
        await mesh.close()
    return _summarise(rows, args, load0)


def _summarise(
    rows: dict[int, list[dict[str, Any]]], args: argparse.Namespace, load0: tuple[float, ...]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for c, rs in rows.items():
        summary[str(c)] = {
            "engine_tokens_per_s": median(r["engine"]["tokens_per_s"] for r in rs),
            "mesh_tokens_per_s": median(r["mesh"]["tokens_per_s"] for r in rs),
            "tokens_per_s_ratio": median(
                r["mesh"]["tokens_per_s"] / r["engine"]["tokens_per_s"] for r in rs
            ),
            "engine_ttft_p50_ms": median(r["engine"]["ttft_p50_ms"] for r in rs),
            "mesh_ttft_p50_ms": median(r["mesh"]["ttft_p50_ms"] for r in rs),
            "added_ttft_p50_ms": median(
                r["mesh"]["ttft_p50_ms"] - r["engine"]["ttft_p50_ms"] for r in rs
            ),
            "ratio_spread": [
                min(r["mesh"]["tokens_per_s"] / r["engine"]["tokens_per_s"] for r in rs),
                max(r["mesh"]["tokens_per_s"] / r["engine"]["tokens_per_s"] for r in rs),
            ],
        }
    print(f"\n  {'streams':>7} {'engine tok/s':>12} {'mesh tok/s':>10} {'ratio':>6} "
          f"{'engine TTFT':>11} {'mesh TTFT':>9} {'added':>8}  (medians over rounds)")  # fmt: skip
    for label, s in summary.items():
        print(
            f"  {label:>7} {s['engine_tokens_per_s']:>12.0f} {s['mesh_tokens_per_s']:>10.0f} "
            f"{s['tokens_per_s_ratio']:>6.3f} {s['engine_ttft_p50_ms']:>8.2f} ms "
            f"{s['mesh_ttft_p50_ms']:>6.2f} ms {s['added_ttft_p50_ms']:>+6.2f} ms"
        )
    targets = []
    for label, s in summary.items():
        ratio, added = s["tokens_per_s_ratio"], s["added_ttft_p50_ms"]
        targets.append(Target(f"mesh/engine tokens/s @{label}", ratio, 0.95, "x", True))
        targets.append(Target(f"added TTFT p50 @{label} (mesh - engine)", added, 1.0, "ms", False))
    result = {
        "benchmark": "vllm_overhead",
        "model": MODEL,
        "shape": SHAPE,
        "options": OPTIONS,
        "tokens_per_stream": args.tokens,
        "rounds": args.rounds,
        "summary": summary,
        "rows": {str(c): rs for c, rs in rows.items()},
        "machine": machine(load0) | {"vllm": _vllm_version()},
    }
    name = "vllm_overhead.quick" if args.quick else "vllm_overhead"
    finish(result, targets, results_path(args.out, name))
    return result


def _vllm_version() -> str:
    return str(importlib.import_module("vllm").__version__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="measured rounds per concurrency")
    p.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    p.add_argument("--quick", action="store_true", help="3 rounds of 64 tokens")
    p.add_argument("--out", type=Path, default=None, help="JSON result path")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.tokens = 3, 64
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":  # the engine spawns processes: keep this guard
    main()
