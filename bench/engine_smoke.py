"""The batched torch engine against the sequential one on one device: same tokens?

Loads the demo model twice (float32, so kernels cannot flip a greedy pick), runs the
same greedy requests, joined into one running batch on the batched engine (CUDA graphs
on a GPU) and one by one on the sequential engine (transformers' own cache), and fails
if any token differs. Then times the batched engine's bare decode step per batch size
for the model given by --model-dir (the GPU check's 200M model, say).

    python -m bench.engine_smoke --device cuda
    python -m bench.engine_smoke --device cpu --option compile=inductor
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from meshserve.demo import TINY_LLAMA, make_demo
from meshserve.vocab import Device
from worker.backends import create_backend
from worker.backends.base import GenerateBackend
from worker.backends.torch_batched import BatchedCausalLM
from worker.model_repo import default_models_dir, load_spec
from worker.types import GenerateInput, ModelSpec, SamplingParams

PROMPTS = [
    "Anna found a golden kettle near the",
    "The baker",
    "Once upon a time a quiet fisherman sailed past the old lighthouse and",
    "Tom",
    "In the morning the",
]


async def _tokens(backend: GenerateBackend, prompt: str, n: int) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    out: list[int] = []
    async for chunk in backend.generate(GenerateInput("s", TINY_LLAMA, prompt, None, params)):
        out.extend(chunk.token_ids)
    return out


async def compare(spec: ModelSpec, device: Device, extra: dict[str, str]) -> bool:
    opts = {**spec.options, "dtype": "float32"}
    batched_opts = {**opts, "engine": "batched", **extra}
    batched = create_backend(replace(spec, max_concurrency=8, options=batched_opts))
    sequential = create_backend(replace(spec, options={**opts, "engine": "sequential"}))
    assert isinstance(batched, GenerateBackend) and isinstance(sequential, GenerateBackend)
    await batched.load(device)
    await sequential.load(device)
    try:
        lengths = [40, 7, 25, 33, 12]
        got = await asyncio.gather(
            *(_tokens(batched, p, n) for p, n in zip(PROMPTS, lengths, strict=True))
        )
        want = [await _tokens(sequential, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
        assert isinstance(batched, BatchedCausalLM)
        runner = batched.runner
        graphs = runner.graphs_captured() if runner is not None else 0
        same = got == want
        print(
            f"engine smoke on {device.label}: batched == sequential: {same} "
            f"(batch sizes seen {sorted(set(batched.batch_sizes))}, graphs {graphs})",
            flush=True,
        )
        if not same:
            for g, w in zip(got, want, strict=True):
                print("  batched   ", g[:20], "\n  sequential", w[:20])
        return same
    finally:
        await batched.unload()
        await sequential.unload()


async def step_times(spec: ModelSpec, device: Device, batches: list[int]) -> None:
    backend = create_backend(replace(spec, max_concurrency=max(batches)))
    await backend.load(device)
    try:
        assert isinstance(backend, BatchedCausalLM) and backend.runner is not None
        runner = backend.runner
        for b in batches:
            bucket = runner.batch_bucket(b)
            for _ in range(5):
                runner.decode(bucket, 256)
            if device.kind == "cuda":
                torch.cuda.synchronize()
            n, t = 50, time.perf_counter()
            for _ in range(n):
                runner.decode(bucket, 256)
            if device.kind == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / n * 1e3
            print(f"  bare decode step, batch {bucket:3d}: {ms:.3f} ms", flush=True)
    finally:
        await backend.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", type=Path, help="also time decode steps of this model")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="batched arm option"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = Device(args.device)
    models_dir = default_models_dir()
    make_demo(models_dir)
    extra = dict(o.split("=", 1) for o in args.option)
    ok = asyncio.run(compare(load_spec(models_dir, TINY_LLAMA), device, extra))
    if args.model_dir is not None:
        spec = load_spec(args.model_dir.parent, args.model_dir.name)
        print(f"decode step times, {spec.name} on {device.label}:", flush=True)
        asyncio.run(step_times(spec, device, [1, 8, 32]))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
