"""In-process mesh for integration tests: real etcd, real grpc.aio servers on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.server import Gateway
from meshserve.client import MeshClient
from meshserve.config import GatewaySettings, WorkerSettings
from worker.lifecycle import Worker


@dataclass
class Mesh:
    gateway: Gateway
    workers: dict[str, Worker]
    client: MeshClient
    etcd_endpoint: str
    models_dir: Path
    _extra: list[Worker] = field(default_factory=list)

    async def add_worker(self, worker_id: str, models: Sequence[str], **kw: object) -> Worker:
        w = Worker(worker_settings(self.etcd_endpoint, self.models_dir, worker_id, models, **kw))
        await w.start()
        self.workers[worker_id] = w
        return w

    async def wait_fleet(self, model: str, n: int, timeout: float = 10.0) -> None:
        await self.gateway.view.wait_for(
            lambda ws: sum(1 for w in ws.values() if w.serves(model)) >= n, timeout=timeout
        )


def worker_settings(
    etcd: str, models_dir: Path, worker_id: str, models: Sequence[str], **kw: object
) -> WorkerSettings:
    return WorkerSettings(
        worker_id=worker_id,
        listen="127.0.0.1:0",
        etcd=[etcd],
        models=list(models),
        models_dir=models_dir,
        lease_ttl=2,
        drain_grace_s=5.0,
        **kw,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running_mesh(
    etcd_endpoint: str,
    models_dir: Path,
    *,
    workers: int = 2,
    models: Sequence[str] = ("tiny-llama", "minilm"),
    **gateway_settings: Any,
) -> AsyncIterator[Mesh]:
    """A gateway (its settings: `gateway_settings` over the test defaults) and `workers`
    workers serving `models`, all ready; everything stopped on the way out."""
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "etcd": [etcd_endpoint],
        "drain_grace_s": 1,
    }
    gateway = Gateway(GatewaySettings(**(settings | gateway_settings)))
    await gateway.start()
    mesh = Mesh(gateway, {}, MeshClient(gateway.address), etcd_endpoint, models_dir)
    try:
        for i in range(1, workers + 1):
            await mesh.add_worker(f"w{i}", models)
        for m in models:
            await mesh.wait_fleet(m, workers)
        yield mesh
    finally:
        await mesh.client.close()
        for w in mesh.workers.values():
            await w.stop()
        await gateway.stop()
