"""Health that means something: the gateway's and the workers' health services follow
the registry view and the models, per model too; transitions awaited on Health.Watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import Gateway
from meshserve.config import GatewaySettings
from meshserve.etcd_process import EtcdProcess, free_port
from tests.mesh import Mesh, running_mesh

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE = "meshserve.v1.Inference"


async def check(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(resp.status)


async def until(address: str, service: str, status: int, timeout_s: float = 15.0) -> None:
    """Until Health.Watch reports `status` for `service` (no polling: a stream)."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
        async for resp in call:
            if resp.status == status:
                call.cancel()
                return
    raise AssertionError(f"{service!r} never reached {status}")


@pytest.fixture
async def mesh(etcd: EtcdProcess, models_dir: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, models_dir, workers=1, models=("minilm",)) as m:
        yield m


async def test_gateway_follows_its_workers_and_names_models(mesh: Mesh) -> None:
    gw = mesh.gateway.address
    await until(gw, "", SERVING)
    assert await check(gw, INFERENCE) == SERVING
    assert await check(gw, f"{INFERENCE}/minilm") == SERVING
    assert await check(gw, "grpc.health.v1.Health") == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:  # a model nobody ever listed
        await check(gw, f"{INFERENCE}/no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    w1 = mesh.workers["w1"]
    assert await check(w1.address, f"{INFERENCE}/minilm") == SERVING
    # The only worker leaves: nothing is ready, the gateway says so, per model too.
    await w1.stop()
    await until(gw, "", NOT_SERVING)
    assert await check(gw, f"{INFERENCE}/minilm") == NOT_SERVING
    # And comes back.
    await mesh.add_worker("w2", ["minilm"])
    await until(gw, f"{INFERENCE}/minilm", SERVING)
    assert await check(gw, "") == SERVING
    status = mesh.gateway.health.status() if mesh.gateway.health else None
    assert status is not None and status.registry_connected and status.ready_models == ("minilm",)


async def test_a_gateway_that_never_reached_etcd_is_not_serving() -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", etcd=[dead], drain_grace_s=0))
    await gateway.start()
    try:
        assert await check(gateway.address, "") == NOT_SERVING
        assert gateway.health is not None
        st = gateway.health.status()
        assert not st.ever_connected and "never reached etcd" in st.detail
    finally:
        await gateway.stop()


async def test_an_etcd_outage_keeps_the_gateway_serving_on_its_last_view(
    mesh: Mesh, etcd: EtcdProcess
) -> None:
    gw = mesh.gateway.address
    await until(gw, "", SERVING)
    view = mesh.gateway.view
    await etcd.stop()
    await view.wait_for(lambda _ws: not view.connected, timeout=15)
    assert await check(gw, "") == SERVING  # still routing on the last known view
    assert mesh.gateway.health is not None
    st = mesh.gateway.health.status()
    assert not st.registry_connected and "stale" in st.detail
    await etcd.start()
    await view.wait_for(lambda _ws: view.connected, timeout=30)


async def test_shutdown_says_not_serving_before_it_stops(mesh: Mesh) -> None:
    gw = mesh.gateway
    await until(gw.address, "", SERVING)
    async with grpc.aio.insecure_channel(gw.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(gw.stop())
        # The watcher hears NOT_SERVING (graceful shutdown) before the server goes.
        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()
        await stopping
