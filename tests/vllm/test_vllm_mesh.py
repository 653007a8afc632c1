"""The vLLM backend behind a real worker and gateway (real etcd, real gRPC, real engine)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from meshserve.v1 import inference_pb2
from tests.mesh import Mesh
from tests.vllm.helpers import MAX_MODEL_LEN, MAX_NUM_SEQS, MODEL, wait_until
from worker.backends.vllm import VLLMBackend
from worker.types import FinishReason, GenerateInput, SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

LENGTH = inference_pb2.FINISH_REASON_LENGTH
STOP = inference_pb2.FINISH_REASON_STOP


def _req(
    prompt: str | None = "Once upon a time", ids: list[int] | None = None, **sampling: Any
) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(
        model=MODEL, sampling=inference_pb2.SamplingParams(**sampling)
    )
    if ids is not None:
        req.prompt_token_ids.extend(ids)
    elif prompt is not None:
        req.prompt = prompt
    return req


async def _collect(mesh: Mesh, req: inference_pb2.GenerateRequest) -> list[Any]:
    return [m async for m in mesh.client.stub.Generate(req, timeout=60)]


def _tokens(msgs: list[Any]) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


async def test_token_id_prompt_streams_with_exact_usage(mesh: Mesh) -> None:
    prompt = [0, 17, 250, 1000, 42]
    msgs = await _collect(mesh, _req(ids=prompt, max_tokens=9, ignore_eos=True, seed=3))
    assert len(msgs) >= 2  # streamed, not one message at the end
    assert all(m.finish_reason == 0 for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == LENGTH
    assert last.usage.prompt_tokens == len(prompt)
    assert last.usage.completion_tokens == len(_tokens(msgs)) == 9


async def test_text_prompt_usage_counts_the_models_tokens(mesh: Mesh, backend: VLLMBackend) -> None:
    prompt = "Emma found a golden key near the river."
    expected = len(backend.engine.get_tokenizer().encode(prompt))
    msgs = await _collect(mesh, _req(prompt, max_tokens=5, ignore_eos=True))
    assert msgs[-1].usage.prompt_tokens == expected > 1
    assert msgs[-1].usage.completion_tokens == 5
    assert "".join(m.text for m in msgs)


async def test_same_seed_same_tokens_other_seed_differs(mesh: Mesh) -> None:
    def req(seed: int) -> inference_pb2.GenerateRequest:
        return _req(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)

    first = _tokens(await _collect(mesh, req(7)))
    again = _tokens(await _collect(mesh, req(7)))
    other = _tokens(await _collect(mesh, req(8)))
    assert first == again
    assert first != other


async def test_stop_string_cuts_text_and_reports_stop(mesh: Mesh) -> None:
    greedy: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
    full_msgs = await _collect(mesh, _req(max_tokens=24, **greedy))
    full = "".join(m.text for m in full_msgs)
    assert len(full) > 12
    stop = full[8:12]
    cut = full.index(stop)
    msgs = await _collect(mesh, _req(max_tokens=24, stop=[stop], **greedy))
    assert msgs[-1].finish_reason == STOP
    assert "".join(m.text for m in msgs) == full[:cut]
    assert msgs[-1].usage.completion_tokens == len(_tokens(msgs)) < 24


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (_req(ids=[5] * (MAX_MODEL_LEN - 4), max_tokens=8), "context length"),
        (_req(ids=[1, 999_999], max_tokens=4), "out of range"),
        (_req(max_tokens=4, top_p=1.5), "top_p"),
    ],
    ids=["prompt-too-long", "token-out-of-vocab", "top-p-above-1"],
)
async def test_bad_requests_are_invalid_argument(
    mesh: Mesh, request_: inference_pb2.GenerateRequest, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _collect(mesh, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


async def test_client_cancel_aborts_the_request_in_the_engine(
    mesh: Mesh, backend: VLLMBackend
) -> None:
    engine = backend.engine
    aborted: list[str] = []
    abort_sent = asyncio.Event()
    real_abort = engine.abort

    async def spy_abort(request_id: str, internal: bool = False) -> None:
        await real_abort(request_id, internal)
        aborted.append(request_id)
        abort_sent.set()

    engine.abort = spy_abort  # an instance attribute: vLLM's own calls go through it too
    try:
        call = mesh.client.stub.Generate(
            _req(max_tokens=MAX_MODEL_LEN - 16, ignore_eos=True), timeout=60
        )
        first = await anext(aiter(call))  # the engine is generating for this request now
        assert engine.get_num_unfinished_requests() == 1
        call.cancel()
        await asyncio.wait_for(abort_sent.wait(), 10)
    finally:
        del engine.abort
    assert any(rid.startswith(first.request_id) for rid in aborted), aborted
    await wait_until(lambda: engine.get_num_unfinished_requests() == 0)
    await wait_until(lambda: backend.active_requests == 0 and backend.load_report().running == 0)
    # The engine core dropped it too: the next request runs alone in its batch (the
    # scheduler's stats of the step that produced its first token count 1 running).
    steps = backend.engine_stats.steps
    msgs: list[inference_pb2.GenerateResponse] = []
    async for m in mesh.client.stub.Generate(_req(max_tokens=32, ignore_eos=True), timeout=60):
        if not msgs:
            assert backend.engine_stats.steps > steps
            assert backend.engine_stats.running == 1
        msgs.append(m)
    assert msgs[-1].usage.completion_tokens == 32


async def test_closing_the_backend_stream_aborts(backend: VLLMBackend) -> None:
    engine = backend.engine
    request = GenerateInput(
        request_id="close-me",
        model=MODEL,
        prompt="The baker",
        prompt_token_ids=None,
        sampling=SamplingParams(max_tokens=400, ignore_eos=True),
    )
    stream = backend.generate(request)
    chunk = await anext(stream)
    assert chunk.finish is None and chunk.token_ids
    assert engine.output_processor.external_req_ids.get("close-me")
    await stream.aclose()
    assert engine.get_num_unfinished_requests() == 0
    assert "close-me" not in engine.output_processor.external_req_ids
    assert backend.active_requests == 0


async def test_cancelling_the_reading_task_aborts(backend: VLLMBackend) -> None:
    engine = backend.engine
    started = asyncio.Event()
    request = GenerateInput(
        request_id="cancel-me",
        model=MODEL,
        prompt=None,
        prompt_token_ids=(0, 10, 20),
        sampling=SamplingParams(max_tokens=400, ignore_eos=True),
    )

    async def read() -> None:
        async for _ in backend.generate(request):
            started.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.get_num_unfinished_requests() == 0
    assert backend.active_requests == 0


async def test_concurrent_streams_are_batched_and_complete(
    mesh: Mesh, backend: VLLMBackend
) -> None:
    n = MAX_NUM_SEQS
    all_started = asyncio.Barrier(n + 1)

    async def stream(i: int) -> list[Any]:
        msgs = []
        call = mesh.client.stub.Generate(
            _req(ids=[0, 100 + i], max_tokens=160, seed=i, ignore_eos=True), timeout=60
        )
        async for m in call:
            msgs.append(m)
            if len(msgs) == 1:
                await all_started.wait()
        return msgs

    tasks = [asyncio.create_task(stream(i)) for i in range(n)]
    await asyncio.wait_for(all_started.wait(), 30)
    report = backend.load_report()
    assert report.capacity == MAX_NUM_SEQS
    assert report.running + report.waiting == n
    assert report.kv_cache_tokens >= n * MAX_MODEL_LEN
    await wait_until(lambda: backend.engine_stats.running > 1)  # one batch, not one by one
    assert backend.load_report().kv_cache_use > 0
    results = await asyncio.gather(*tasks)
    for msgs in results:
        assert msgs[-1].finish_reason == LENGTH
        assert msgs[-1].usage.completion_tokens == len(_tokens(msgs)) == 160
        assert msgs[-1].usage.prompt_tokens == 2
    assert len({tuple(_tokens(m)) for m in results}) == n  # each its own seed
    await wait_until(lambda: backend.active_requests == 0)
    assert backend.load_report().running == backend.load_report().waiting == 0


async def test_backend_finish_chunk(backend: VLLMBackend) -> None:
    request = GenerateInput(
        request_id="direct",
        model=MODEL,
        prompt=None,
        prompt_token_ids=(0, 5),
        sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
    )
    chunks = [c async for c in backend.generate(request)]
    assert chunks[-1].finish is FinishReason.LENGTH
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert sum(len(c.token_ids) for c in chunks) == 4


async def test_a_greedy_continuation_goes_on_token_for_token(mesh: Mesh) -> None:
    # What the gateway sends when it resumes a stream on another worker (a client may
    # send it too): vLLM continues greedy streams exactly (docs/reliability.md).
    prompt = [0, 17, 250, 1000, 42]
    whole = await _collect(mesh, _req(ids=prompt, max_tokens=12, temperature=0.0, ignore_eos=True))
    ids = _tokens(whole)
    req = _req(ids=prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
    req.continuation.token_ids.extend(ids[:5])
    req.continuation.resumed = 1
    rest = await _collect(mesh, req)
    assert _tokens(rest) == ids[5:]
    assert rest[-1].usage.completion_tokens == 12  # the continued tokens count once
    assert rest[-1].usage.prompt_tokens == len(prompt)
    assert rest[-1].finish_reason == LENGTH and rest[-1].resumed == 1
