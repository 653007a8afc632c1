"""A Generate stream whose worker connection breaks mid-stream goes on on another
worker, token for token; with migration switched off it ends with UNAVAILABLE (real
gateway, two workers with the fake backend, etcd, gRPC over loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import inference_pb2
from tests.mesh import Mesh, running_mesh

SLOW = {"per_request_ms": "1", "per_token_ms": "10", "slots": "4", "seed": "1"}
TOKENS = 80


@pytest.fixture
async def mesh(etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, tmp_path, workers=0, models=()) as m:
        for name in ("s", "t"):
            await m.add_worker(name, [], fake_models=["fake"], fake_options=SLOW)
        await m.wait_fleet("fake", 2)
        yield m


def _request(*, seed: int, disable: bool = False) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="fake",
        prompt="the quick brown fox",
        sampling=inference_pb2.SamplingParams(max_tokens=TOKENS, temperature=0.8, seed=seed),
        disable_migration=disable,
    )


async def _whole(mesh: Mesh, req: inference_pb2.GenerateRequest, *, cut_after: int | None
                 ) -> list[inference_pb2.GenerateResponse]:  # fmt: skip
    call = mesh.client.stub.Generate(req, timeout=30)
    out: list[inference_pb2.GenerateResponse] = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        assert isinstance(msg, inference_pb2.GenerateResponse)
        out.append(msg)
        if cut_after is not None and len(out) == cut_after:
            await mesh.gateway.forwarder.close()  # every worker connection breaks at once
    return out


def _ids(msgs: list[inference_pb2.GenerateResponse]) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


async def test_a_broken_stream_goes_on_elsewhere_token_for_token(mesh: Mesh) -> None:
    unbroken = await _whole(mesh, _request(seed=7), cut_after=None)
    broken = await _whole(mesh, _request(seed=7), cut_after=3)
    assert _ids(broken) == _ids(unbroken) and len(_ids(broken)) == TOKENS
    assert "".join(m.text for m in broken) == "".join(m.text for m in unbroken)
    last = broken[-1]
    assert last.resumed == 1 and unbroken[-1].resumed == 0
    assert last.usage.completion_tokens == TOKENS  # counted once, across both workers
    assert last.usage.prompt_tokens == unbroken[-1].usage.prompt_tokens
    assert last.finish_reason == unbroken[-1].finish_reason


async def test_with_migration_off_a_broken_stream_ends_with_unavailable(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _whole(mesh, _request(seed=7, disable=True), cut_after=3)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "closed during the call" in (info.value.details() or "")
