"""meshserve gateways and workers as real processes (the one launcher,
meshserve.launch), for tests across process borders."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshserve.etcd_process import free_port
from meshserve.launch import Child, launch, meshserve_argv
from meshserve.v1 import inference_pb2, inference_pb2_grpc, types_pb2

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Proc:
    child: Child
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return self.child.address


@dataclass
class Procs:
    """Started processes, all stopped (SIGTERM, then SIGKILL) when the block ends."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    started: list[Child] = field(default_factory=list)

    def spawn(self, name: str, args: Sequence[str], *, metrics: bool = True) -> Proc:
        address = f"127.0.0.1:{free_port()}"
        metrics_port = free_port() if metrics else 0
        argv = meshserve_argv(*args, "--listen", address)
        if metrics:
            argv += ["--metrics-port", str(metrics_port)]
        env = {"HF_HUB_OFFLINE": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        child = launch(name, argv, self.log_dir / f"{name}.log", address=address, env=env, cwd=ROOT)
        self.started.append(child)
        return Proc(child, metrics_port)

    async def stop(self) -> None:
        for child in reversed(self.started):  # gateways before the workers they call
            await child.stop(15)


@contextlib.asynccontextmanager
async def processes(log_dir: Path, **env: str) -> AsyncIterator[Procs]:
    procs = Procs(log_dir, dict(env))
    try:
        yield procs
    finally:
        await procs.stop()


async def wait_models(gateway: Proc, models: Sequence[str], timeout_s: float = 60.0) -> None:
    """Until the gateway lists every model in `models` as READY (real calls, retried)."""
    async with asyncio.timeout(timeout_s), grpc.aio.insecure_channel(gateway.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        while True:
            gateway.child.check_alive()
            try:
                resp = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                ready = {m.name for m in resp.models if m.state == types_pb2.MODEL_STATE_READY}
                if set(models) <= ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)  # polling another process: there is no event to await
