"""Gateway drain on stop: NOT_SERVING while still accepting calls for `drain_accept_s`,
then no new calls; open ones get `drain_grace_s`, and those still open then end with
the gateway's own UNAVAILABLE (GATEWAY_DRAINING), not grpc's "Cancelling all calls".
Real etcd, a real gateway and a worker with FakeBackend models."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from gateway.server import Gateway
from meshserve.client import MeshClient
from meshserve.config import GatewaySettings
from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import inference_pb2
from tests.integration.test_health import until
from tests.mesh import worker_settings
from worker.backends.fake import WORK_INPUT, FakeBackend
from worker.lifecycle import Worker

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN_MS = 10  # per token: a stream of n tokens takes about n * 10 ms


@pytest.fixture
async def worker(etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Worker]:
    w = Worker(
        worker_settings(
            etcd.endpoint, tmp_path, "d1", [],
            fake_models=["fake", "echo:infer"],
            fake_options={"per_request_ms": "1", "per_token_ms": str(TOKEN_MS), "slots": "8"},
        )
    )  # fmt: skip
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


@contextlib.asynccontextmanager
async def gateway(etcd: EtcdProcess, accept_s: float, grace_s: float) -> AsyncIterator[Gateway]:
    """A started gateway that sees the worker. The test calls `stop()` (in a task, to
    watch the drain); it is stopped here if the test did not get that far."""
    gw = Gateway(
        GatewaySettings(
            listen="127.0.0.1:0",
            etcd=[etcd.endpoint],
            drain_accept_s=accept_s,
            drain_grace_s=grace_s,
        )
    )
    await gw.start()
    try:
        await gw.view.wait_for(lambda ws: "d1" in ws and ws["d1"].serves("fake"), timeout=10)
        await until(gw.address, "", SERVING)
        yield gw
    finally:
        if gw._server is not None:  # not stopped by the test
            await gw.stop()


def gen(max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="fake", prompt="x", sampling=inference_pb2.SamplingParams(max_tokens=max_tokens)
    )


async def rest_of(call: grpc.aio.UnaryStreamCall) -> list[inference_pb2.GenerateResponse]:
    """The remaining messages of a stream already read with `read()` (the two read
    styles do not mix)."""
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


def _fake(w: Worker, model: str) -> FakeBackend:
    assert w.host is not None
    b = w.host._slots[model].backend
    assert isinstance(b, FakeBackend)
    return b


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    st = rpc_status.from_call(exc)
    assert st is not None, f"no status details on {exc.code()}: {exc.details()}"
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {st}")


async def test_not_serving_at_once_and_still_accepting_new_calls(
    etcd: EtcdProcess, worker: Worker
) -> None:
    async with gateway(etcd, accept_s=2.0, grace_s=1.0) as gw:
        stopping = asyncio.create_task(gw.stop())
        # Health says NOT_SERVING, overall and per model, while the accept period runs...
        await until(gw.address, "", NOT_SERVING)
        await until(gw.address, "meshserve.v1.Inference/fake", NOT_SERVING)
        # ...and a new call on a new connection still succeeds in it.
        async with MeshClient(gw.address) as client:
            call = client.stub.Generate(gen(3), timeout=10)
            msgs = [m async for m in call]
            assert await call.code() == grpc.StatusCode.OK
            assert sum(len(m.token_ids) for m in msgs) == 3
        assert not stopping.done()  # still in the accept period
        await stopping
        # Then the gateway accepts no more calls.
        async with MeshClient(gw.address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.stub.Generate(gen(1), timeout=2).read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_stream_shorter_than_the_grace_finishes(etcd: EtcdProcess, worker: Worker) -> None:
    async with gateway(etcd, accept_s=0.1, grace_s=5.0) as gw, MeshClient(gw.address) as client:
        n = 50  # about 0.5 s of tokens: past the accept period, well within the grace
        call = client.stub.Generate(gen(n), timeout=10)
        first = await call.read()
        assert isinstance(first, inference_pb2.GenerateResponse)
        stopping = asyncio.create_task(gw.stop())
        rest = await rest_of(call)
        assert await call.code() == grpc.StatusCode.OK
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == n
        assert rest[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        # The stop returns once the last call is done, not at the end of the grace.
        await asyncio.wait_for(stopping, timeout=4.0)


async def test_calls_outlasting_the_grace_end_with_retry_elsewhere(
    etcd: EtcdProcess, worker: Worker
) -> None:
    async with gateway(etcd, accept_s=0.1, grace_s=0.5) as gw, MeshClient(gw.address) as client:
        work = inference_pb2.Tensor(
            name=WORK_INPUT, dtype=inference_pb2.DATA_TYPE_FP32, shape=[1],
            raw_contents=np.asarray([60_000.0], dtype=np.float32).tobytes(),
        )  # fmt: skip
        # A minute-long Infer call, then a stream of about 300 s on the same connection:
        # once the stream's first message is back, the gateway serves both.
        infer = client.stub.Infer(inference_pb2.InferRequest(model="echo", inputs=[work]))
        stream = client.stub.Generate(gen(30_000), timeout=30)
        await stream.read()
        assert gw.edge.open_calls == 2
        stopping = asyncio.create_task(gw.stop())
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await rest_of(stream)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await infer
        for exc in (streamed.value, unary.value):
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert "retry on another gateway" in (exc.details() or "")
            assert "Cancelling all calls" not in (exc.details() or "")
            info = _error_info(exc)
            assert (info.reason, info.domain) == ("GATEWAY_DRAINING", "meshserve")
            assert info.metadata["gateway"] == gw.address
        await stopping
        # Ending the calls stopped their work on the worker too.
        for model in ("fake", "echo"):
            await asyncio.wait_for(_fake(worker, model).wait_idle(), timeout=5)
