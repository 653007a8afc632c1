"""The gateway's health, kept in grpc's health service as the registry view changes.

`""` and `meshserve.v1.Inference`: SERVING once the gateway has reached etcd and while
some worker has some model READY; NOT_SERVING otherwise (a readiness probe then takes the
gateway out of its Service). `meshserve.v1.Inference/<model>`: SERVING while at least one
worker has the model READY and is not draining. Through an etcd outage the gateway keeps
routing on its last view, and keeps its health: `GatewayStatus` (Admin.GetStatus, the
fleet page, metrics) says the view is stale and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from meshserve.grpc_server import INFERENCE_SERVICE, Server, model_service
from registry.records import WorkerRecord

log = logging.getLogger(__name__)


class ViewState(Protocol):
    @property
    def workers(self) -> Mapping[str, WorkerRecord]: ...

    @property
    def connected(self) -> bool: ...

    @property
    def ever_connected(self) -> bool: ...

    @property
    def last_error(self) -> str: ...

    def staleness_s(self) -> float | None: ...

    def models(self) -> set[str]: ...

    def add_state_listener(self, cb: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class GatewayStatus:
    serving: bool
    registry_connected: bool
    ever_connected: bool
    view_age_s: float | None  # since etcd last answered (None: never)
    registry_error: str  # the last error while disconnected
    workers: int
    ready_models: tuple[str, ...]
    models: tuple[str, ...]

    @property
    def detail(self) -> str:
        if not self.ever_connected:
            return f"never reached etcd: {self.registry_error or 'connecting'}"
        if not self.registry_connected:
            age = f"{self.view_age_s:.0f}s" if self.view_age_s is not None else "?"
            return (
                f"registry view stale ({age} old; etcd unreachable: {self.registry_error}); "
                "routing on the last known view"
            )
        if not self.ready_models:
            return "no worker has a model ready"
        n = len(self.ready_models)
        return f"{self.workers} workers, {n} model{'' if n == 1 else 's'} ready"


def status_of(view: ViewState) -> GatewayStatus:
    ready = sorted({m.name for w in view.workers.values() for m in w.models if w.serves(m.name)})
    return GatewayStatus(
        serving=view.ever_connected and bool(ready),
        registry_connected=view.connected,
        ever_connected=view.ever_connected,
        view_age_s=view.staleness_s(),
        registry_error=view.last_error,
        workers=len(view.workers),
        ready_models=tuple(ready),
        models=tuple(sorted(view.models())),
    )


class GatewayHealth:
    """One task that writes the health service whenever the view changes."""

    def __init__(self, view: ViewState, server: Server) -> None:
        self._view = view
        self._server = server
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._published: dict[str, bool] = {}
        view.add_state_listener(self._dirty.set)

    def status(self) -> GatewayStatus:
        return status_of(self._view)

    async def start(self) -> None:
        await self._publish()
        self._task = asyncio.create_task(self._run(), name="gateway-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._publish()
            except Exception:  # the health service must keep following the view
                log.exception("updating gateway health failed")

    async def _publish(self) -> None:
        st = self.status()
        wanted = {"": st.serving, INFERENCE_SERVICE: st.serving}
        ready = set(st.ready_models)
        for model in st.models:
            wanted[model_service(model)] = model in ready
        for name in [n for n in self._published if n not in wanted]:
            wanted[name] = False  # a model no worker lists any more: NOT_SERVING
        for name, serving in wanted.items():
            if self._published.get(name) != serving:
                await self._server.set_serving(serving, [name])
                self._published[name] = serving
