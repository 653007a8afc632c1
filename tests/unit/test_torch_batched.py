"""The continuous-batching engine on the real tiny-llama demo model (CPU, float32).

The behaviour both engines share is in test_torch_lm.py; here: requests joining and
leaving a running batch, the static cache's limits, load reports, failures, fallback.
"""

from __future__ import annotations

import asyncio
import importlib
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshserve.errors import Internal, InvalidArgument
from meshserve.vocab import Device
from worker.backends import create_backend
from worker.backends.base import GenerateBackend
from worker.backends.detok import ByteLevelDetokenizer, detokenizer_factory
from worker.backends.torch_batched import BatchedCausalLM
from worker.model_repo import load_spec
from worker.types import FinishReason, GenerateChunk, GenerateInput, SamplingParams

CPU = Device("cpu")
PROMPTS = [
    "Anna found a golden kettle near the",
    "The baker",
    "Once upon a time a quiet fisherman sailed past the old lighthouse and",
    "Tom",
]


def spec_with(models_dir: Path, **options: str) -> Any:
    spec = load_spec(models_dir, "tiny-llama")
    return replace(spec, max_concurrency=4, options={**spec.options, **options})


@pytest.fixture
async def batched(models_dir: Path) -> AsyncIterator[BatchedCausalLM]:
    backend = create_backend(spec_with(models_dir, max_cache_len="256"))
    assert isinstance(backend, BatchedCausalLM)
    await backend.load(CPU)
    assert backend.engine == "batched"
    yield backend
    await backend.unload()


def req(prompt: str, **sampling: Any) -> GenerateInput:
    return GenerateInput("r", "tiny-llama", prompt, None, SamplingParams(**sampling))


async def collect(gen: AsyncIterator[GenerateChunk]) -> list[GenerateChunk]:
    return [c async for c in gen]


def ids(chunks: list[GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def reference(models_dir: Path, requests: list[GenerateInput]) -> list[list[int]]:
    """Each request alone on the sequential engine (transformers' own cache)."""
    seq = create_backend(spec_with(models_dir, engine="sequential"))
    assert isinstance(seq, GenerateBackend)
    await seq.load(CPU)
    try:
        return [ids(await collect(seq.generate(r))) for r in requests]
    finally:
        await seq.unload()


async def test_requests_join_and_leave_a_running_batch(
    batched: BatchedCausalLM, models_dir: Path
) -> None:
    long = req(PROMPTS[0], max_tokens=60, temperature=0.0, ignore_eos=True)
    late = [
        req(p, max_tokens=n, temperature=0.0, ignore_eos=True)
        for p, n in zip(PROMPTS[1:], (5, 25, 12), strict=True)
    ]
    expected = await reference(models_dir, [long, *late])
    finished: list[int] = []
    five = asyncio.Event()

    async def consume(i: int, r: GenerateInput) -> list[GenerateChunk]:
        chunks = []
        async for chunk in batched.generate(r):
            chunks.append(chunk)
            if i == 0 and len(chunks) == 5:
                five.set()
        finished.append(i)
        return chunks

    first = asyncio.create_task(consume(0, long))
    await five.wait()  # the long request is decoding: the others join it
    rest = await asyncio.gather(*(consume(i + 1, r) for i, r in enumerate(late)))
    got = [await first, *rest]
    # Same tokens as each request alone: rows at different positions do not mix.
    assert [ids(c) for c in got] == expected
    assert max(batched.batch_sizes) >= 3  # they decoded together...
    assert finished[-1] == 0  # ...and the short ones left while the long one ran on
    assert all(c[-1].finish is FinishReason.LENGTH for c in got)
    assert batched.load_report().running == 0


async def test_more_requests_than_slots_wait_for_a_free_row(batched: BatchedCausalLM) -> None:
    requests = [req(PROMPTS[i % 4], max_tokens=6, temperature=0.0) for i in range(10)]
    results = await asyncio.gather(*(collect(batched.generate(r)) for r in requests))
    assert all(1 <= len(ids(c)) <= 6 for c in results)
    assert max(batched.batch_sizes) <= batched.slots == 4
    assert any(c[-1].queue_s > 0 for c in results)  # some waited for a slot
    await batched.wait_idle()
    assert batched.load_report().waiting == 0


async def test_load_report_counts_rows_and_cache(batched: BatchedCausalLM) -> None:
    report = batched.load_report()
    assert (report.capacity, report.kv_cache_tokens, report.running) == (4, 4 * 256, 0)
    gen = batched.generate(req(PROMPTS[0], max_tokens=100, temperature=0.0, ignore_eos=True))
    await anext(gen)
    report = batched.load_report()
    assert report.running == 1 and 0 < report.kv_cache_use < 1
    await gen.aclose()
    await batched.wait_idle()
    assert batched.load_report().running == 0


async def test_cache_length_limits_a_sequence(batched: BatchedCausalLM) -> None:
    with pytest.raises(InvalidArgument, match="256-token KV cache per sequence"):
        await collect(batched.generate(req(PROMPTS[0], max_tokens=250)))
    # The engine goes on serving.
    assert len(ids(await collect(batched.generate(req(PROMPTS[1], max_tokens=3))))) <= 3


async def test_sampled_rows_are_seeded_per_request(batched: BatchedCausalLM) -> None:
    def sampled(seed: int) -> GenerateInput:
        return req(PROMPTS[0], max_tokens=15, temperature=1.0, seed=seed, ignore_eos=True)

    alone = ids(await collect(batched.generate(sampled(7))))
    # The same seed in a batch next to greedy and other sampled rows: same draws.
    crowd = await asyncio.gather(
        collect(batched.generate(sampled(7))),
        collect(batched.generate(sampled(8))),
        collect(batched.generate(req(PROMPTS[2], max_tokens=15, temperature=0.0))),
    )
    assert ids(crowd[0]) == alone
    assert ids(crowd[1]) != alone


async def test_an_engine_failure_fails_its_requests_and_the_engine_recovers(
    batched: BatchedCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = batched._runner
    assert runner is not None
    real = runner.decode

    def broken(batch: int, span: int) -> Any:
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "decode", broken)
    with pytest.raises(Internal, match="device lost"):
        await collect(batched.generate(req(PROMPTS[0], max_tokens=5)))
    monkeypatch.setattr(runner, "decode", real)
    assert len(ids(await collect(batched.generate(req(PROMPTS[1], max_tokens=4))))) <= 4


async def test_bad_options_and_unknown_engine(models_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown engine 'turbo'"):
        create_backend(spec_with(models_dir, engine="turbo"))
    backend = create_backend(spec_with(models_dir, max_cache_len="lots"))
    with pytest.raises(InvalidArgument, match="max_cache_len='lots' is not an integer"):
        await backend.load(CPU)
    backend = create_backend(spec_with(models_dir, compile="fast"))
    with pytest.raises(InvalidArgument, match="compile='fast'; use auto, inductor or off"):
        await backend.load(CPU)


async def test_other_architectures_fall_back_to_the_sequential_engine(
    models_dir: Path, tmp_path: Path
) -> None:
    transformers: Any = importlib.import_module("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(models_dir / "tiny-llama"))
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128
    )
    model_dir = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    spec = replace(spec_with(models_dir), name="tiny-gpt2", path=str(model_dir))
    backend = create_backend(spec)
    assert isinstance(backend, BatchedCausalLM)
    await backend.load(CPU)
    try:
        assert backend.engine == "sequential"
        chunks = await collect(backend.generate(req("The baker", max_tokens=4)))
        assert 1 <= len(ids(chunks)) <= 4 and chunks[-1].finish is not None
        assert backend.load_report().capacity == 4
    finally:
        await backend.unload()


def test_byte_level_detokenizer_matches_decode(models_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models_dir / "tiny-llama"))
    make = detokenizer_factory(tok)
    assert isinstance(make(), ByteLevelDetokenizer)
    rng = random.Random(0)
    for _ in range(200):  # random ids: split characters, special tokens, anything
        seq = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))]
        detok = make()
        text = "".join(detok.add(i) for i in seq) + detok.flush()
        assert text == tok.decode(seq, skip_special_tokens=True)
