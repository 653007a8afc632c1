"""Worker lifecycle: load models, serve, register in etcd, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from meshserve import __version__
from meshserve.config import WorkerSettings, advertise_address
from meshserve.edge import Edge, EdgeHook
from meshserve.errors import InvalidArgument, MeshError
from meshserve.grpc_server import (
    INFERENCE_SERVICE,
    LOAD_SERVICE,
    Server,
    model_service,
    new_server,
)
from meshserve.httpd import MetricsServer
from meshserve.process import freeze_startup_heap, serve_until_signal
from meshserve.tracing import Tracing
from meshserve.vocab import Device, ModelKind, ModelState, WorkerState
from registry import records
from registry.etcd import EtcdRegistry
from registry.guard import RecordGuard
from registry.metrics import RegistryMetrics
from registry.observe import NO_REGISTRY_OBSERVER
from worker.backends import create_backend
from worker.host import BackendFactory, ModelHost
from worker.load_service import LoadReportingServicer
from worker.metrics import HostCollector, WorkerMetrics
from worker.model_repo import load_spec
from worker.observe import (
    NO_ENGINE_OBSERVER,
    NO_HOST_OBSERVER,
    EngineObserver,
    HostObserver,
    HostObservers,
)
from worker.servicer import WorkerServicer
from worker.tracing import HostTracer
from worker.types import ModelSpec

log = logging.getLogger(__name__)

HEALTH_CHECK_S = 2.0  # how often engines are asked whether they still work


def parse_device(text: str) -> Device:
    """`cpu`, `cuda`, `cuda:N` or `mps`, checked against what this machine has."""
    kind, _, idx = text.strip().lower().partition(":")
    index = int(idx) if idx.isdigit() else 0
    if kind == "cpu":
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return Device("cpu", 0, "cpu", pages * page_size)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise InvalidArgument(f"device {text!r} requested but no such CUDA device here")
        props = torch.cuda.get_device_properties(index)
        return Device("cuda", index, props.name, int(props.total_memory))
    if kind == "mps":
        return Device("mps", 0, "mps", 0)
    raise InvalidArgument(f"unknown device {text!r}: use cpu, cuda:N or mps")


class Worker:
    """One worker process's services. `start()` then `stop()`; or `run()` until a signal."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        specs: list[ModelSpec] | None = None,
        factory: BackendFactory | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.resolved_worker_id()
        self._specs = specs
        self._factory = factory
        self._progress = progress or (lambda msg: log.info("%s", msg))
        self._server: Server | None = None
        self.edge = Edge()
        self.metrics: WorkerMetrics | None = None
        self._health_published: dict[str, bool] = {}
        # Traces only when an OTLP endpoint is configured (MESHSERVE_OTLP_ENDPOINT).
        self.tracing = Tracing.from_env("meshserve-worker")
        self.metrics_port = 0
        self._http: MetricsServer | None = None
        self._registry: EtcdRegistry | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = asyncio.Event()
        self._registered = asyncio.Event()
        self.guard: RecordGuard | None = None
        self._start_time = datetime.now(UTC)
        self.address = ""
        self.host: ModelHost | None = None

    def record(self) -> records.WorkerRecord:
        assert self.host is not None
        return records.WorkerRecord(
            worker_id=self.worker_id,
            address=self.address,
            device=self.host.device,
            models=tuple(
                records.ModelEntry(
                    name=st.spec.name,
                    kind=st.spec.kind,
                    state=st.state,
                    backend=st.spec.backend,
                    error=st.error[:500],
                    max_concurrency=st.max_concurrency,
                    kv_cache_tokens=st.kv_cache_tokens,
                    max_sequence_length=st.max_sequence_length,
                )
                for st in self.host.statuses()
            ),
            capacity=self.host.capacity,
            state=(WorkerState.DRAINING if self.host.draining else WorkerState.SERVING),
            version=__version__,
            start_time=self._start_time,
            labels=dict(self.settings.labels),
        )

    async def start(self) -> None:
        s = self.settings
        if s.torch_threads:
            import torch

            torch.set_num_threads(s.torch_threads)
        device = parse_device(s.device)
        specs = self._specs or self._configured_specs()
        models = frozenset(spec.name for spec in specs)
        # Metrics only when asked for (--metrics-port): off, the hooks are not there at all.
        self.metrics = WorkerMetrics(models) if s.metrics_port is not None else None
        hooks: list[EdgeHook] = []
        host_observers: list[HostObserver] = []
        if self.metrics is not None:
            hooks.append(self.metrics)
            host_observers.append(self.metrics)
        if self.tracing is not None:
            hooks.append(self.tracing)
            host_observers.append(HostTracer(self.tracing))
        self.edge = Edge(hooks=hooks)
        engine_observer: EngineObserver = self.metrics or NO_ENGINE_OBSERVER
        factory = self._factory or partial(create_backend, observer=engine_observer)
        self.host = ModelHost(
            device=device,
            capacity=s.capacity,
            factory=factory,
            observer=HostObservers(host_observers) if host_observers else NO_HOST_OBSERVER,
        )
        for spec in specs:
            self.host.add(spec)

        server = new_server(s.listen, services=(INFERENCE_SERVICE, LOAD_SERVICE))
        self.address = s.advertise or advertise_address(s.listen, server.port)
        servicer = WorkerServicer(self.host, worker_id=self.worker_id, address=self.address)
        server.add_handlers(
            [servicer.handler(self.edge), LoadReportingServicer(self.host).handler(self.edge)]
        )
        await server.start()
        self._server = server
        await server.set_serving(False)
        if self.metrics is not None:
            self.metrics.registry.register(HostCollector(self.host, asyncio.get_running_loop()))
            self._http = MetricsServer(
                self.metrics.registry,
                host=s.metrics_host or s.listen.rsplit(":", 1)[0],
                port=s.metrics_port or 0,
            )
            self._http.start()
            self.metrics_port = self._http.port
        self._progress(f"worker {self.worker_id} listening on {self.address} ({device.label})")

        # Register early (models LOADING) so the fleet view shows progress.
        observer = RegistryMetrics(self.metrics.registry) if self.metrics else NO_REGISTRY_OBSERVER
        self._registry = EtcdRegistry(s.etcd, ttl=s.lease_ttl, observer=observer)
        await self._registry.connect()
        self.host.add_listener(self._dirty.set)
        self._tasks.append(asyncio.create_task(self._publish_loop(), name="record-publisher"))
        self.guard = RecordGuard(self._registry, self.worker_id)
        self._tasks.append(asyncio.create_task(self._guard_loop(self.guard), name="record-guard"))
        self._dirty.set()

        await self.host.load_all(self._progress)
        ready = [st.spec.name for st in self.host.statuses() if st.state is ModelState.READY]
        freeze_startup_heap()  # the loaded models, before traffic
        await server.set_serving(True, [n for n in server.services if n != INFERENCE_SERVICE])
        await self._publish_health()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="worker-health"))
        self._progress(f"worker {self.worker_id} ready: {', '.join(ready) or 'no models'}")

    async def _publish_health(self) -> None:
        """Per model: SERVING while READY and its engine healthy; overall: while any is."""
        assert self.host is not None and self._server is not None
        if self.host.draining:
            return  # stop() has set everything NOT_SERVING
        wanted = {
            model_service(st.spec.name): self.host.health(st.spec.name).ok
            for st in self.host.statuses()
        }
        serving = any(wanted.values())
        wanted |= {"": serving, INFERENCE_SERVICE: serving}
        for name, ok in wanted.items():
            if self._health_published.get(name) != ok:
                await self._server.set_serving(ok, [name])
                self._health_published[name] = ok

    async def _health_loop(self) -> None:
        """An engine can die without a call noticing (vLLM's engine process): look."""
        while True:
            await asyncio.sleep(HEALTH_CHECK_S)  # a sampling period: engines send no event
            try:
                await self._publish_health()
            except Exception:
                log.exception("updating worker health failed")

    def _configured_specs(self) -> list[ModelSpec]:
        s = self.settings
        if s.fake_models:
            from worker.backends.fake_options import fake_spec

            specs = []
            for item in s.fake_models:  # NAME or NAME:generate|infer
                name, _, kind = item.partition(":")
                try:
                    mkind = ModelKind(kind or "generate")
                except ValueError:
                    raise InvalidArgument(
                        f"fake model {item!r}: kind must be generate or infer"
                    ) from None
                specs.append(fake_spec(name, mkind, **s.fake_options))
            return specs
        return [load_spec(s.models_dir, name) for name in s.models]

    async def _publish_loop(self) -> None:
        """Write the record on change only (coalesced), retrying while etcd is away."""
        assert self._registry is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                if self._registered.is_set():
                    await self._registry.update(self.record())
                else:
                    await self._registry.register(self.record())
                    self._registered.set()
            except Exception as exc:
                # Anything, not only the mapped etcd errors: a publisher that died here
                # would leave a serving worker unregistered, silently.
                detail = exc.message if isinstance(exc, MeshError) else repr(exc)
                log.warning("registry write failed (%s); retrying", detail)
                self._dirty.set()
                await asyncio.sleep(1.0)

    async def _guard_loop(self, guard: RecordGuard) -> None:
        """Put our record back if anyone else deletes or changes it (from the first write)."""
        await self._registered.wait()
        await guard.run()

    async def stop(self) -> None:
        """Drain: stop taking work, finish in-flight within the grace, leave etcd, exit."""
        if self.host is not None and not self.host.draining:
            self.host.start_draining()
            self._progress(f"worker {self.worker_id} draining ({self.host.inflight} in flight)")
            if self._server is not None:
                await self._server.set_serving(False)
            if self._registry is not None:
                with contextlib.suppress(MeshError):
                    await asyncio.wait_for(self._registry.update(self.record()), 3.0)
            try:
                await asyncio.wait_for(self.host.wait_idle(), self.settings.drain_grace_s)
            except TimeoutError:
                # The grace is over: engines drop what still runs, so its streams end
                # with CANCELLED now instead of being cut when the server stops.
                dropped = await self.host.abort_all()
                log.warning("drain grace over: %d requests aborted in the engines", dropped)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._registry is not None:
            await self._registry.deregister()
            await self._registry.close()
            self._registry = None
        if self._server is not None:
            await self._server.stop(1.0)
            self._server = None
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self.host is not None:
            await self.host.unload_all()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports what is buffered

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then drain and stop."""
        await serve_until_signal(self.start, self.stop)
