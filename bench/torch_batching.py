"""Continuous batching vs one request at a time, in-process, on the demo model.

Both arms are the worker's own torch backends on tiny-llama (random weights, CPU,
float32), loaded side by side: `engine: batched` (continuous batching over the static
KV cache) and `engine: sequential` (one request per forward pass; concurrent requests
interleave step by step, so the device does one sequence's work at a time). Each round
runs N concurrent streams of MAX_TOKENS tokens (ignore_eos, greedy) on each arm in turn
(A B A B ...); reported: tokens/s per arm (median over rounds) and the median of the
per-round ratios. Target (issue 4): batched / sequential >= 3 at 16 streams.

    python -m bench.torch_batching            # 16 streams, 5 rounds
    python -m bench.torch_batching --streams 1 8 16 32 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import replace

import torch

from bench.report import RESULTS_DIR, machine, write_results
from bench.stats import median
from meshserve.demo import TINY_LLAMA, make_demo
from meshserve.vocab import Device
from worker.backends import create_backend
from worker.backends.base import GenerateBackend
from worker.model_repo import default_models_dir, load_spec
from worker.types import GenerateInput, SamplingParams

MAX_TOKENS = 64
PROMPT = "Anna found a golden kettle near the"
RESULTS = RESULTS_DIR / "torch_batching.json"


async def _round(backend: GenerateBackend, streams: int) -> tuple[float, float]:
    """Tokens/s and median time to first token (ms) of `streams` concurrent streams."""
    ttfts: list[float] = []

    async def one(i: int) -> int:
        start = time.perf_counter()
        tokens = 0
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        async for chunk in backend.generate(
            GenerateInput(f"r{i}", TINY_LLAMA, PROMPT, None, params)
        ):
            if tokens == 0:
                ttfts.append((time.perf_counter() - start) * 1e3)
            tokens += len(chunk.token_ids)
        return tokens

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(one(i) for i in range(streams))))
    return total / (time.perf_counter() - start), median(ttfts)


async def run(streams_list: list[int], rounds: int) -> dict[str, object]:
    models_dir = default_models_dir()
    make_demo(models_dir)
    spec = load_spec(models_dir, TINY_LLAMA)
    arms: dict[str, GenerateBackend] = {}
    for engine in ("batched", "sequential"):
        backend = create_backend(replace(spec, options={**spec.options, "engine": engine}))
        assert isinstance(backend, GenerateBackend)
        arms[engine] = backend
        await backend.load(Device("cpu"))
    results: dict[str, object] = {}
    try:
        for streams in streams_list:
            for backend in arms.values():  # warm-up
                await _round(backend, streams)
            tps: dict[str, list[float]] = {a: [] for a in arms}
            ttft: dict[str, list[float]] = {a: [] for a in arms}
            ratios = []
            for _ in range(rounds):
                for arm, backend in arms.items():
                    t, f = await _round(backend, streams)
                    tps[arm].append(t)
                    ttft[arm].append(f)
                ratios.append(tps["batched"][-1] / tps["sequential"][-1])
            row = {
                "batched_tok_s": median(tps["batched"]),
                "sequential_tok_s": median(tps["sequential"]),
                "batched_ttft_ms": median(ttft["batched"]),
                "sequential_ttft_ms": median(ttft["sequential"]),
                "ratio_median": median(ratios),
                "ratios": ratios,
            }
            results[str(streams)] = row
            print(
                f"{streams:3d} streams: batched {row['batched_tok_s']:8.0f} tok/s, "
                f"sequential {row['sequential_tok_s']:8.0f} tok/s, ratio "
                f"{row['ratio_median']:.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)}); "
                f"TTFT p50 {row['batched_ttft_ms']:.1f} vs {row['sequential_ttft_ms']:.1f} ms",
                flush=True,
            )
    finally:
        for backend in arms.values():
            await backend.unload()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[16])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    results = asyncio.run(run(args.streams, args.rounds))
    load = os.getloadavg()
    out = {"max_tokens": MAX_TOKENS, "loadavg": load, "results": results, "machine": machine()}
    write_results(RESULTS, out)
    print(f"load average {load[0]:.1f}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
