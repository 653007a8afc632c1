"""Statuses with google.rpc.Status details, from a real worker and through a real gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from tests.mesh import Mesh, running_mesh


@pytest.fixture
async def mesh(etcd: EtcdProcess, models_dir: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, models_dir, workers=1) as m:
        yield m


def _status(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    st = rpc_status.from_call(exc)  # also checks code and message match the status
    assert st is not None, f"no status details on {exc.code()}: {exc.details()}"
    return st


def _unpack(st: status_pb2.Status, cls: type[Message]) -> Message | None:
    for d in st.details:
        if d.Is(cls.DESCRIPTOR):
            msg = cls()
            d.Unpack(msg)
            return msg
    return None


def _bad_top_p() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="tiny-llama", prompt="hi", sampling=inference_pb2.SamplingParams(top_p=2.0)
    )


async def _generate_error(
    stub: inference_pb2_grpc.InferenceStub, req: inference_pb2.GenerateRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(req, timeout=10):
            pass
    return info.value


async def test_a_workers_details_reach_the_client_unchanged(mesh: Mesh) -> None:
    via_gateway = await _generate_error(mesh.client.stub, _bad_top_p())
    async with grpc.aio.insecure_channel(mesh.workers["w1"].address) as ch:
        direct = await _generate_error(inference_pb2_grpc.InferenceStub(ch), _bad_top_p())
    assert via_gateway.code() == direct.code() == grpc.StatusCode.INVALID_ARGUMENT
    gw, wk = _status(via_gateway), _status(direct)
    assert list(gw.details) == list(wk.details)
    bad = _unpack(wk, error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["sampling.top_p"]
    info = _unpack(wk, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_REQUEST", "meshserve")


async def test_the_gateways_own_errors_carry_a_reason(mesh: Mesh) -> None:
    err = await _generate_error(
        mesh.client.stub, inference_pb2.GenerateRequest(model="no-such", prompt="x")
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    info = _unpack(_status(err), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_FOUND" and info.metadata["model"] == "no-such"


@pytest.mark.parametrize("target", ["gateway", "worker"])
async def test_undecodable_bytes_are_invalid_argument_not_unknown(mesh: Mesh, target: str) -> None:
    address = mesh.gateway.address if target == "gateway" else mesh.workers["w1"].address
    async with grpc.aio.insecure_channel(address) as ch:
        infer = ch.unary_unary("/meshserve.v1.Inference/Infer")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await infer(b"\xff\xff\xff\xff", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = _unpack(_status(info.value), error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "request"


async def test_a_full_worker_says_when_to_retry(mesh: Mesh) -> None:
    w = await mesh.add_worker(
        "slow",
        [],
        fake_models=["slow"],
        capacity=1,
        fake_options={"per_request_ms": "0", "per_token_ms": "3000"},
    )
    async with grpc.aio.insecure_channel(w.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        req = inference_pb2.GenerateRequest(model="slow", prompt="x")
        busy = stub.Generate(req, timeout=10)
        await busy.read()  # the first token at once, the next in 3 s: the worker is full
        err = await _generate_error(stub, req)
        busy.cancel()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = _unpack(_status(err), error_details_pb2.RetryInfo)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() > 0
