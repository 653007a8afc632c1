"""TorchCausalLM on the real tiny-llama demo model (random weights, local tokenizer)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshserve.errors import FailedPrecondition, InvalidArgument
from meshserve.vocab import Device
from worker.backends import create_backend
from worker.backends.base import GenerateBackend, InferBackend
from worker.backends.detok import IncrementalDetokenizer, StopMatcher
from worker.backends.torch_lm import TorchCausalLM
from worker.model_repo import load_spec
from worker.types import (
    FinishReason,
    GenerateChunk,
    GenerateInput,
    ModelSpec,
    SamplingParams,
)

PROMPT = "Anna found a golden kettle near the"
CPU = Device("cpu")


@pytest.fixture(params=["batched", "sequential"])
def spec(models_dir: Path, request: pytest.FixtureRequest) -> ModelSpec:
    """The demo model under each engine (the tests below hold for both)."""
    spec = load_spec(models_dir, "tiny-llama")
    return replace(spec, options={**spec.options, "engine": request.param})


@pytest.fixture
async def lm(spec: ModelSpec) -> AsyncIterator[TorchCausalLM]:
    backend = create_backend(spec)
    assert isinstance(backend, TorchCausalLM)
    assert type(backend).__name__ == {"batched": "BatchedCausalLM"}.get(
        spec.options["engine"], "TorchCausalLM"
    )
    await backend.load(CPU)
    yield backend
    await backend.unload()


def lm_engine(lm: TorchCausalLM) -> str:
    return str(getattr(lm, "engine", "sequential"))


def req(
    prompt: str | None = PROMPT, ids: tuple[int, ...] | None = None, **sampling: Any
) -> GenerateInput:
    return GenerateInput("r1", "tiny-llama", prompt, ids, SamplingParams(**sampling))


async def run(lm: TorchCausalLM, request: GenerateInput) -> list[GenerateChunk]:
    return [c async for c in lm.generate(request)]


def token_ids(chunks: list[GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks: list[GenerateChunk]) -> str:
    return "".join(c.text for c in chunks)


async def test_stream_concatenates_to_the_decoded_text_with_exact_usage(lm: TorchCausalLM) -> None:
    for seed in range(4):  # sampled text hits odd byte tokens: exercises held-back U+FFFD
        chunks = await run(lm, req(max_tokens=40, temperature=1.0, seed=seed))
        ids = token_ids(chunks)
        assert all(c.finish is None and c.usage is None for c in chunks[:-1])
        assert all(len(c.token_ids) == 1 for c in chunks)  # one chunk per decode step
        last = chunks[-1]
        assert last.finish in (FinishReason.LENGTH, FinishReason.STOP)
        assert last.usage is not None
        assert last.usage.prompt_tokens == len(lm.tokenizer(PROMPT).input_ids)
        assert last.usage.completion_tokens == len(ids)
        eos = lm.tokenizer.eos_token_id
        if last.finish is FinishReason.LENGTH:
            assert len(ids) == 40 and eos not in ids
        else:
            assert ids[-1] == eos and eos not in ids[:-1]
        assert text(chunks) == lm.tokenizer.decode(ids, skip_special_tokens=True)


async def test_seeds_and_greedy_are_reproducible(lm: TorchCausalLM) -> None:
    a = token_ids(await run(lm, req(max_tokens=12, seed=123)))
    b = token_ids(await run(lm, req(max_tokens=12, seed=123)))
    c = token_ids(await run(lm, req(max_tokens=12, seed=124)))
    assert a == b
    assert a != c
    g1 = token_ids(await run(lm, req(max_tokens=12, temperature=0.0)))
    g2 = token_ids(await run(lm, req(max_tokens=12, temperature=0.0, seed=5)))
    assert g1 == g2


async def test_top_k_one_is_greedy_and_top_p_runs(lm: TorchCausalLM) -> None:
    greedy = token_ids(await run(lm, req(max_tokens=8, temperature=0.0)))
    assert token_ids(await run(lm, req(max_tokens=8, top_k=1, seed=9))) == greedy
    assert token_ids(await run(lm, req(max_tokens=8, top_p=1e-6, seed=9))) == greedy
    chunks = await run(lm, req(max_tokens=8, top_k=50, top_p=0.9, temperature=0.7, seed=1))
    assert len(token_ids(chunks)) == 8 and chunks[-1].finish is FinishReason.LENGTH


async def test_token_id_prompt_matches_text_prompt(lm: TorchCausalLM) -> None:
    ids = tuple(lm.tokenizer(PROMPT).input_ids)
    by_text = await run(lm, req(max_tokens=6, temperature=0.0))
    by_ids = await run(lm, req(None, ids, max_tokens=6, temperature=0.0))
    assert token_ids(by_ids) == token_ids(by_text)
    assert by_ids[-1].usage == by_text[-1].usage


async def test_max_tokens_finishes_with_length_on_the_last_token(lm: TorchCausalLM) -> None:
    chunks = await run(lm, req(max_tokens=5, temperature=0.0))
    assert len(chunks) == 5
    assert chunks[-1].finish is FinishReason.LENGTH and chunks[-1].token_ids
    one = await run(lm, req(max_tokens=1, temperature=0.0))
    assert len(one) == 1 and one[0].finish is FinishReason.LENGTH
    assert one[0].usage is not None and one[0].usage.completion_tokens == 1


async def test_stop_string_cuts_the_output(lm: TorchCausalLM) -> None:
    free = await run(lm, req(max_tokens=30, temperature=0.0))
    full = text(free)
    # A stop string across a chunk boundary: a partial match must be held back.
    k = next(k for k in range(2, len(free) - 1) if free[k].text and free[k + 1].text)
    stop = free[k].text[-1:] + free[k + 1].text[:2]
    cut = full.index(stop)
    chunks = await run(lm, req(max_tokens=30, temperature=0.0, stop=("never-there", stop)))
    assert text(chunks) == full[:cut]
    assert chunks[-1].finish is FinishReason.STOP
    ids = token_ids(chunks)
    assert ids == token_ids(free)[: len(ids)] and len(ids) < 30
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ids)


async def test_eos_from_generation_config_stops(spec: ModelSpec, tmp_path: Path) -> None:
    # Make the 4th greedy token an extra EOS id in a copy of the model.
    model_dir = tmp_path / "tiny-eos"
    shutil.copytree(str(spec.path), model_dir)
    backend = TorchCausalLM(replace(spec, name="tiny-eos", path=str(model_dir)))
    await backend.load(CPU)
    try:
        greedy = token_ids(await run(backend, req(max_tokens=10, temperature=0.0)))
        k = next(k for k in range(3, 10) if greedy[k] not in greedy[:k])
        await backend.unload()
        gen_cfg = model_dir / "generation_config.json"
        cfg = json.loads(gen_cfg.read_text())
        cfg["eos_token_id"] = [cfg["eos_token_id"], greedy[k]]
        gen_cfg.write_text(json.dumps(cfg))
        backend = TorchCausalLM(replace(spec, name="tiny-eos", path=str(model_dir)))
        await backend.load(CPU)
        chunks = await run(backend, req(max_tokens=10, temperature=0.0))
        assert token_ids(chunks) == greedy[: k + 1]  # EOS is reported as a token...
        assert chunks[-1].finish is FinishReason.STOP
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == k + 1
        # ...but never as text.
        assert text(chunks) == backend.tokenizer.decode(greedy[:k], skip_special_tokens=True)
        # ignore_eos: the EOS id is just another token.
        chunks = await run(backend, req(max_tokens=10, temperature=0.0, ignore_eos=True))
        assert token_ids(chunks) == greedy and chunks[-1].finish is FinishReason.LENGTH
        assert text(chunks) == backend.tokenizer.decode(greedy, skip_special_tokens=True)
    finally:
        await backend.unload()


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (req(temperature=-0.1), "temperature"),
        (req(temperature=float("nan")), "temperature"),
        (req(top_p=0.0), "top_p"),
        (req(top_p=1.5), "top_p"),
        (req(top_k=-1), "top_k"),
        (req(max_tokens=0), "max_tokens"),
        (req(stop=("",)), "stop"),
        (req(None, None), "prompt"),
        (req("hi", (1, 2)), "exactly one"),
        (req(None, ()), "empty"),
        (req(None, (5, 10**6)), r"prompt_token_ids\[1\] = 1000000"),
        (req(None, (5, -1)), "out of range"),
        (req(None, (5,) * 2040, max_tokens=16), "2056 exceeds the context length 2048"),
    ],
)
async def test_invalid_requests(lm: TorchCausalLM, request_: GenerateInput, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        await run(lm, request_)
    assert lm.active_requests == 0


async def test_wrong_calls_and_lifecycle(spec: ModelSpec) -> None:
    lm = TorchCausalLM(spec)
    with pytest.raises(FailedPrecondition, match="not loaded"):
        await run(lm, req())
    caps = await lm.load(CPU)
    assert lm.max_context == 2048 and lm.vocab_size == len(lm.tokenizer)
    assert caps.max_sequence_length == lm.max_sequence_len > 0
    assert isinstance(lm, GenerateBackend) and not isinstance(lm, InferBackend)
    await lm.unload()
    with pytest.raises(FailedPrecondition, match="not loaded"):
        await run(lm, req())
    missing = TorchCausalLM(replace(spec, path=str(Path(str(spec.path)) / "nope")))
    with pytest.raises(FailedPrecondition, match="does not exist"):
        await missing.load(CPU)


async def test_aclose_stops_decoding(lm: TorchCausalLM) -> None:
    await lm.wait_idle()  # idle already: returns at once
    gen = lm.generate(req(max_tokens=1000, temperature=1.0, seed=0))
    first = [await anext(gen), await anext(gen)]
    assert lm.active_requests == 1 and all(c.finish is None for c in first)
    await gen.aclose()
    await lm.wait_idle()
    steps = lm.steps_total
    assert lm.active_requests == 0
    # The sequential engine steps only when asked; the batched one runs ahead of a
    # slow consumer but stops at the next step boundary.
    assert steps == 2 if lm_engine(lm) == "sequential" else steps < 1000
    # The backend thread runs a 3-token request, and nothing of the closed one.
    await run(lm, req(max_tokens=3, temperature=0.0))
    assert lm.steps_total == steps + 3


async def test_cancelling_the_consumer_stops_decoding(lm: TorchCausalLM) -> None:
    got_two = asyncio.Event()

    async def consume() -> None:
        n = 0
        async for _ in lm.generate(req(max_tokens=1000, temperature=1.0, seed=0)):
            n += 1
            if n == 2:
                got_two.set()

    task = asyncio.create_task(consume())
    await got_two.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await lm.wait_idle()
    # A step already on the thread may still finish: flush it with a 1-token request.
    await run(lm, req(max_tokens=1, temperature=0.0))
    steps = lm.steps_total
    assert steps < (10 if lm_engine(lm) == "sequential" else 1000)
    await run(lm, req(max_tokens=3, temperature=0.0))
    assert lm.steps_total == steps + 3


async def test_concurrent_requests_interleave_and_finish(lm: TorchCausalLM) -> None:
    order: list[str] = []
    solo = token_ids(await run(lm, req(max_tokens=10, temperature=0.0)))

    async def consume(name: str, seed: int | None) -> list[GenerateChunk]:
        chunks = []
        async for chunk in lm.generate(
            req(max_tokens=10, temperature=0.0 if seed is None else 1.0, seed=seed)
        ):
            order.append(name)
            chunks.append(chunk)
        return chunks

    a, b = await asyncio.gather(consume("a", None), consume("b", 1))
    assert token_ids(a) == solo  # interleaving does not disturb a request's own state
    assert a[-1].finish is not None and b[-1].finish is not None
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")  # b started before a ended
    assert order.index("a") < len(order) - 1 - order[::-1].index("b")
    assert lm.active_requests == 0


def test_detokenizer_holds_back_split_characters(models_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models_dir / "tiny-llama"))
    sample = "Anna's café: 世界 🙂 ok"
    ids = tok(sample, add_special_tokens=False).input_ids
    assert len(ids) > len(sample.split())  # the CJK and emoji are split into byte tokens
    detok = IncrementalDetokenizer(lambda i: str(tok.decode(i, skip_special_tokens=True)))
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == sample


def test_stop_matcher_holds_back_prefixes() -> None:
    m = StopMatcher(("STOP", "end."))
    assert m.feed("hello S") == ("hello ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)  # disambiguated: released
    assert m.feed(" the en") == (" the ", False)
    assert m.feed("d. more") == ("", True)
    m = StopMatcher(("ab",))
    assert m.feed("xa") == ("x", False)
    assert m.flush() == "a"  # generation ended: the held text can no longer be a stop
    assert StopMatcher(()).feed("abc") == ("abc", False)
    # The earliest match wins, also when both arrive in one delta.
    assert StopMatcher(("STOP", "END")).feed("xxENDyySTOP") == ("xx", True)
