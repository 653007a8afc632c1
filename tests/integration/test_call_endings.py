"""Every way a call can end yields a status: a channel closed under an open stream, a
deadline that passed before the call was sent (real gateway, worker, etcd, gRPC)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import inference_pb2
from tests.mesh import Mesh, running_mesh

SLOW = {"per_request_ms": "1", "per_token_ms": "20", "slots": "4", "seed": "1"}


@pytest.fixture
async def mesh(etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, tmp_path, workers=0, models=()) as m:
        await m.add_worker("s", [], fake_models=["fake"], fake_options=SLOW)
        await m.wait_fleet("fake", 1)
        yield m


async def test_a_stream_whose_worker_channel_closes_ends_with_unavailable(mesh: Mesh) -> None:
    req = inference_pb2.GenerateRequest(
        model="fake", prompt="x", sampling=inference_pb2.SamplingParams(max_tokens=500)
    )
    call = mesh.client.stub.Generate(req, timeout=30)
    await call.read()  # the stream is open on the worker
    await mesh.gateway.forwarder.close()  # what a worker leaving the view does, at once
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "closed during the call" in (info.value.details() or "")
    status = rpc_status.from_call(info.value)
    assert status is not None and status.details  # ErrorInfo and RetryInfo ride along


async def test_a_call_past_its_deadline_gets_deadline_exceeded(mesh: Mesh) -> None:
    x = inference_pb2.Tensor(
        name="x", dtype=inference_pb2.DATA_TYPE_INT8, shape=[1], raw_contents=b"\x01"
    )
    # A deadline so short that it passes in the client or at the gateway: either way the
    # client gets DEADLINE_EXCEEDED, never a hang.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.client.stub.Infer(inference_pb2.InferRequest(model="fake", inputs=[x]),
                                     timeout=1e-6)  # fmt: skip
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
