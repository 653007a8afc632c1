"""A resumed stream (a continuation of N delivered tokens) yields exactly what the
unbroken stream yields after token N: the same tokens (greedy and seeded sampling),
the rest of the text (what the first worker held back included, a stop string
straddling the break still matched) and the same usage and finish. Real engines: the
tiny-llama demo model under both torch engines, and the FakeBackend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshserve.errors import InvalidArgument
from meshserve.vocab import Device, ModelKind
from worker.backends import create_backend
from worker.backends.base import GenerateBackend
from worker.backends.draws import uniform
from worker.backends.fake import FakeBackend
from worker.backends.fake_options import fake_spec
from worker.model_repo import load_spec
from worker.types import GenerateChunk, GenerateInput, SamplingParams

CPU = Device("cpu")
PROMPT = "Anna found a golden kettle near the"


@pytest.fixture(params=["batched", "sequential", "fake"])
async def lm(models_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[GenerateBackend]:
    backend: GenerateBackend
    if request.param == "fake":
        spec = fake_spec("tiny-llama", ModelKind.GENERATE, per_request_ms="0", per_token_ms="0")
        backend = FakeBackend(spec)
    else:
        spec = load_spec(models_dir, "tiny-llama")
        made = create_backend(replace(spec, options={**spec.options, "engine": request.param}))
        assert isinstance(made, GenerateBackend)
        backend = made
    await backend.load(CPU)
    yield backend
    await backend.unload()


def _req(rid: str = "r", continuation: tuple[int, ...] = (), **sampling: Any) -> GenerateInput:
    params = SamplingParams(**{"max_tokens": 24, **sampling})
    return GenerateInput(rid, "tiny-llama", PROMPT, None, params, continuation=continuation)


async def _run(lm: GenerateBackend, request: GenerateInput) -> list[GenerateChunk]:
    return [c async for c in lm.generate(request)]


def _ids(chunks: list[GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _text(chunks: list[GenerateChunk]) -> str:
    return "".join(c.text for c in chunks)


async def _check_resumes(lm: GenerateBackend, breaks: list[int], **sampling: Any) -> None:
    ref = await _run(lm, _req(**sampling))
    ids = _ids(ref)
    assert all(len(c.token_ids) == 1 for c in ref)  # one chunk per token: breaks line up
    # Every resumed copy at once: in the batched engine they share decode steps.
    resumed = await asyncio.gather(
        *(_run(lm, _req(continuation=tuple(ids[:n]), **sampling)) for n in breaks)
    )
    for n, rest in zip(breaks, resumed, strict=True):
        assert _ids(rest) == ids[n:], f"break after {n} tokens"
        assert _text(ref[:n]) + _text(rest) == _text(ref), f"break after {n} tokens"
        assert rest[-1].usage == ref[-1].usage and rest[-1].finish == ref[-1].finish


async def test_greedy_streams_resume_exactly(lm: GenerateBackend) -> None:
    await _check_resumes(lm, [1, 5, 17, 23], temperature=0.0)


async def test_seeded_sampling_resumes_with_the_unbroken_streams_draws(
    lm: GenerateBackend,
) -> None:
    await _check_resumes(lm, [1, 2, 9, 23], temperature=1.0, top_p=0.9, top_k=50, seed=2026)


async def test_a_stop_string_straddling_the_break_still_matches(lm: GenerateBackend) -> None:
    free = await _run(lm, _req(temperature=0.7, seed=5))
    # A stop string spanning tokens 8-11's text, which then ends the stream there.
    stop = "".join(c.text for c in free[8:12]).strip()[:6]
    assert len(stop) >= 2
    ref = await _run(lm, _req(temperature=0.7, seed=5, stop=(stop,)))
    assert stop not in _text(ref) and len(ref) <= 12
    await _check_resumes(lm, list(range(1, len(ref))), temperature=0.7, seed=5, stop=(stop,))


async def test_a_continuation_as_long_as_max_tokens_is_refused(lm: GenerateBackend) -> None:
    ids = _ids(await _run(lm, _req(temperature=0.0, max_tokens=4)))
    with pytest.raises(InvalidArgument, match="continuation"):
        await _run(lm, _req(temperature=0.0, max_tokens=4, continuation=(*ids, 0)))


async def test_a_continuation_out_of_the_vocabulary_is_refused(lm: GenerateBackend) -> None:
    with pytest.raises(InvalidArgument, match=r"continuation.token_ids\[1\]"):
        await _run(lm, _req(continuation=(1, 10**9)))


def test_draws_depend_on_seed_and_position_only() -> None:
    draws = [uniform(7, p) for p in range(1000)]
    assert draws == [uniform(7, p) for p in range(1000)]
    assert draws != [uniform(8, p) for p in range(1000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.05  # roughly uniform
