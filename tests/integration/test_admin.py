"""The gateway's Admin service and `meshserve ctl` against a real mesh."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import admin_pb2, admin_pb2_grpc, inference_pb2
from tests.mesh import Mesh, running_mesh


@pytest.fixture
async def mesh(etcd: EtcdProcess, models_dir: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, models_dir, workers=2, models=("minilm",)) as m:
        yield m


def _embed_request() -> inference_pb2.InferRequest:
    return inference_pb2.InferRequest(
        model="minilm",
        inputs=[
            inference_pb2.Tensor(
                name="text", dtype=inference_pb2.DATA_TYPE_STRING, shape=[1],
                string_contents=["hello"],
            )
        ],
    )  # fmt: skip


async def test_status_workers_and_traffic_share(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway.address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        status = await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert status.serving and status.registry_connected
        assert list(status.ready_models) == ["minilm"] and status.workers == 2
        for _ in range(6):
            await mesh.client.stub.Infer(_embed_request(), timeout=30)
        workers = (await admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=5)).workers
    assert [w.worker_id for w in workers] == ["w1", "w2"]
    assert sum(w.traffic_share for w in workers) == pytest.approx(1.0)
    assert all(w.models[0].name == "minilm" and w.report_age_seconds >= 0 for w in workers)
    assert any(w.models[0].service_time_seconds > 0 for w in workers)


async def test_route_explain_names_the_pick_and_moves_nothing(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway.address) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        req = admin_pb2.ExplainRouteRequest(model="minilm", policy="round_robin")
        first = await admin.ExplainRoute(req, timeout=5)
        again = await admin.ExplainRoute(req, timeout=5)
        assert first.policy == "round_robin+affinity" and first.model == "minilm"
        # A rotation policy's cursor did not move: explaining is read-only.
        assert first.chosen_worker == again.chosen_worker
        assert {c.worker_id for c in first.candidates} == {"w1", "w2"}
        assert [c.rank for c in first.candidates] == [0, 1]
        assert first.candidates[0].worker_id == first.chosen_worker
        assert "slots" in first.candidates[0].inputs and "queue" in first.candidates[0].scores
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ExplainRoute(admin_pb2.ExplainRouteRequest(model="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.ExplainRoute(
                admin_pb2.ExplainRouteRequest(model="minilm", policy="nope"), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _ctl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshserve", "ctl", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.e2e
async def test_meshserve_ctl(mesh: Mesh) -> None:
    target = ("--target", mesh.gateway.address)
    rc, out, err = await _ctl("route-explain", "--model", "minilm", "--json", *target)
    assert rc == 0, err
    explained = json.loads(out)
    assert explained["chosenWorker"] in ("w1", "w2") and len(explained["candidates"]) == 2
    rc, out, err = await _ctl("workers", *target)
    assert rc == 0 and "w1" in out and "w2" in out, err
    rc, out, err = await _ctl("status", *target)
    assert rc == 0 and "connected" in out, err
    rc, out, err = await _ctl("models", *target)
    assert rc == 0 and "minilm" in out, err
    rc, _, err = await _ctl("route-explain", "--model", "nope", *target)
    assert rc == 1 and "NOT_FOUND" in err
