"""Gateway + workers end to end: real etcd, real gRPC on loopback, real torch models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from meshserve.etcd_process import EtcdProcess
from meshserve.metadata import WORKER_ID_KEY
from meshserve.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from tests.mesh import Mesh, running_mesh
from worker.backends.torch_lm import TorchCausalLM


@pytest.fixture
async def mesh(etcd: EtcdProcess, models_dir: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, models_dir) as m:
        yield m


def _gen(model: str = "tiny-llama", **sampling: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model,
        prompt="Once upon a time",
        sampling=inference_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def _lm(mesh: Mesh, worker_id: str) -> TorchCausalLM:
    host = mesh.workers[worker_id].host
    assert host is not None
    backend = host._slots["tiny-llama"].backend
    assert isinstance(backend, TorchCausalLM)
    return backend


async def _worker_of(call: grpc.aio.UnaryStreamCall) -> str:
    """The worker that served a finished call (the gateway names it in the trailer)."""
    md = await call.trailing_metadata()
    return str(dict(md)[WORKER_ID_KEY])


async def test_generate_streams_tokens_and_ends_with_usage(mesh: Mesh) -> None:
    stub = mesh.client.stub
    msgs = [m async for m in stub.Generate(_gen(max_tokens=12, temperature=0.0), timeout=30)]
    assert len(msgs) > 1
    assert all(m.finish_reason == 0 for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason in (
        inference_pb2.FINISH_REASON_LENGTH,
        inference_pb2.FINISH_REASON_STOP,
    )
    tokens = [t for m in msgs for t in m.token_ids]
    assert last.usage.completion_tokens == len(tokens) > 0
    assert last.usage.prompt_tokens > 0
    assert len({m.request_id for m in msgs}) == 1 and msgs[0].request_id


async def test_same_seed_same_text_through_either_worker(mesh: Mesh) -> None:
    async def text() -> str:
        return "".join(
            [
                m.text
                async for m in mesh.client.stub.Generate(_gen(max_tokens=10, seed=7), timeout=30)
            ]
        )

    results = await asyncio.gather(*(text() for _ in range(4)))
    assert len(set(results)) == 1


async def test_infer_returns_384_wide_embeddings(mesh: Mesh) -> None:
    emb = await mesh.client.embed("minilm", ["a cat", "a kitten", "tax law"], timeout=30)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


async def test_list_models_shows_the_fleet(mesh: Mesh) -> None:
    resp = await mesh.client.list_models(timeout=5)
    by_name = {m.name: m for m in resp.models}
    assert set(by_name) == {"tiny-llama", "minilm"}
    for m in by_name.values():
        assert m.state == types_pb2.MODEL_STATE_READY
        assert sorted(r.worker_id for r in m.replicas) == ["w1", "w2"]
        assert all(r.address.startswith("127.0.0.1:") and r.device == "cpu" for r in m.replicas)
    assert by_name["tiny-llama"].kind == types_pb2.MODEL_KIND_GENERATE
    # Per-model capacity from the engine: 16 batch rows of a 2048-token static KV cache.
    llama = by_name["tiny-llama"].replicas[0]
    assert (llama.max_concurrency, llama.kv_cache_tokens, llama.max_sequence_length) == (
        16,
        16 * 2048,
        2048,
    )
    assert by_name["minilm"].kind == types_pb2.MODEL_KIND_INFER
    # A worker answers the same RPC about itself.
    w1 = mesh.workers["w1"]
    async with grpc.aio.insecure_channel(w1.address) as ch:
        own = await inference_pb2_grpc.InferenceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), timeout=5
        )
    assert {r.worker_id for m in own.models for r in m.replicas} == {"w1"}


async def test_bad_requests_get_clear_statuses(mesh: Mesh) -> None:
    stub = mesh.client.stub
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(_gen(model="no-such-model"), timeout=10):
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (info.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(inference_pb2.GenerateRequest(model="tiny-llama"), timeout=10):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in (info.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(_gen(model="minilm"), timeout=10):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Infer" in (info.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListModels(inference_pb2.ListModelsRequest(model="nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    bad_tensor = inference_pb2.InferRequest(
        model="minilm",
        inputs=[inference_pb2.Tensor(name="text", dtype=inference_pb2.DATA_TYPE_FP32, shape=[1])],
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Infer(bad_tensor, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancelled_stream_stops_generation_on_the_worker(mesh: Mesh) -> None:
    call = mesh.client.stub.Generate(_gen(max_tokens=1500, ignore_eos=True), timeout=60)
    first = await call.read()
    await call.read()
    assert first.text is not None
    busy = [w for w in mesh.workers if _lm(mesh, w).active_requests == 1]
    assert len(busy) == 1
    worker_id = busy[0]
    lm = _lm(mesh, worker_id)
    call.cancel()
    await asyncio.wait_for(lm.wait_idle(), 10)
    steps = lm.steps_total
    assert steps < 1500
    # Another full request finishing proves the engine thread moved on without it.
    w = mesh.workers[worker_id]
    async with grpc.aio.insecure_channel(w.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        _ = [m async for m in stub.Generate(_gen(max_tokens=3), timeout=30)]
    # At most the 3-token request's own steps (plus prefill): the cancelled one is gone.
    assert lm.steps_total <= steps + 4
    assert lm.active_requests == 0
    host = mesh.workers[worker_id].host
    assert host is not None and host.inflight == 0


async def test_deadline_is_honoured_and_frees_the_worker(mesh: Mesh) -> None:
    call = mesh.client.stub.Generate(_gen(max_tokens=1500, ignore_eos=True), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for wid in mesh.workers:
        await asyncio.wait_for(_lm(mesh, wid).wait_idle(), 10)


async def test_retries_on_another_worker_when_one_is_down(mesh: Mesh) -> None:
    # Kill w1's server without leaving etcd: the gateway still believes in it.
    w1 = mesh.workers["w1"]
    assert w1._server is not None
    await w1._server.stop(None)
    for _ in range(4):
        call = mesh.client.stub.Generate(_gen(max_tokens=3), timeout=30)
        msgs = [m async for m in call]
        assert msgs[-1].usage.completion_tokens >= 1
        assert await _worker_of(call) == "w2"


async def test_draining_worker_receives_no_new_work(mesh: Mesh) -> None:
    w1 = mesh.workers["w1"]
    await w1.stop()
    await mesh.gateway.view.wait_for(lambda ws: "w1" not in ws, timeout=10)
    for _ in range(3):
        call = mesh.client.stub.Generate(_gen(max_tokens=2), timeout=30)
        _ = [m async for m in call]
        assert await _worker_of(call) == "w2"
