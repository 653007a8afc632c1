"""The models a worker hosts: specs, backends, states, admission and in-flight accounting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from meshserve.errors import (
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from meshserve.load import LoadSnapshot
from meshserve.vocab import Device, ModelKind, ModelState
from worker.backends.base import Backend, GenerateBackend, InferBackend
from worker.observe import NO_HOST_OBSERVER, Generation, HostObserver
from worker.types import (
    BackendHealth,
    Capabilities,
    GenerateChunk,
    GenerateInput,
    InferInput,
    InferOutput,
    ModelSpec,
    ModelStatus,
)

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelSpec], Backend]


@dataclass
class _Slot:
    spec: ModelSpec
    backend: Backend | None = None
    state: ModelState = ModelState.LOADING
    error: str = ""
    capabilities: Capabilities | None = None
    load_s: float = 0.0
    inflight: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # request id -> calls in flight


def _check_kind(spec: ModelSpec, backend: Backend) -> None:
    wanted = GenerateBackend if spec.kind is ModelKind.GENERATE else InferBackend
    if not isinstance(backend, wanted):
        raise InvalidArgument(
            f"model {spec.name}: backend {spec.backend!r} cannot serve {spec.kind.value} models"
        )


@dataclass
class ModelHost:
    """Owns the backends of one worker. Knows nothing of gRPC or etcd."""

    device: Device
    capacity: int
    factory: BackendFactory
    observer: HostObserver = NO_HOST_OBSERVER
    _slots: dict[str, _Slot] = field(default_factory=dict)
    _inflight: int = 0
    _draining: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _listeners: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._idle.set()

    # -- lifecycle -----------------------------------------------------------
    def add(self, spec: ModelSpec) -> None:
        if spec.name in self._slots:
            raise InvalidArgument(f"model {spec.name!r} is configured twice")
        self._slots[spec.name] = _Slot(spec)

    async def load_all(self, on_progress: Callable[[str], None] | None = None) -> None:
        """Load every model; one failing model is marked FAILED, the others still load."""
        for slot in self._slots.values():
            if on_progress:
                on_progress(f"loading {slot.spec.name} ({slot.spec.backend})")
            start = time.monotonic()
            try:
                backend = self.factory(slot.spec)
                _check_kind(slot.spec, backend)
                caps = await backend.load(self.device)
            except Exception as exc:  # an engine can fail in any way; keep serving the rest
                log.exception("model %s failed to load", slot.spec.name)
                slot.state, slot.error = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            else:
                slot.backend, slot.capabilities, slot.state = backend, caps, ModelState.READY
            slot.load_s = time.monotonic() - start
            self._notify()

    async def unload_all(self) -> None:
        for slot in self._slots.values():
            if slot.backend is not None:
                slot.state = ModelState.UNLOADING
                try:
                    await slot.backend.unload()
                except Exception:
                    log.exception("unloading %s failed", slot.spec.name)
                slot.backend = None

    async def abort_all(self) -> int:
        """Ask every engine to drop the requests it still runs (drain timed out);
        returns how many it dropped."""
        dropped = 0
        for slot in self._slots.values():
            if slot.backend is None:
                continue
            for rid in list(slot.requests):
                if await slot.backend.abort(rid):
                    dropped += 1
        return dropped

    def add_listener(self, cb: Callable[[], None]) -> None:
        self._listeners.append(cb)

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    # -- queries -------------------------------------------------------------
    def statuses(self) -> list[ModelStatus]:
        return [
            ModelStatus(s.spec, s.state, s.error, s.capabilities, s.load_s)
            for s in self._slots.values()
        ]

    def health(self, name: str) -> BackendHealth:
        slot = self._slots[name]
        if slot.backend is None or slot.state is not ModelState.READY:
            return BackendHealth(False, f"model {name} is {slot.state.value}")
        return slot.backend.health()

    def model_inflight(self, name: str) -> int:
        return self._slots[name].inflight

    def backend(self, name: str) -> Backend | None:
        """The loaded backend of `name` (for telemetry and operator tools)."""
        return self._slots[name].backend

    @property
    def all_loaded(self) -> bool:
        return all(s.state is not ModelState.LOADING for s in self._slots.values())

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def draining(self) -> bool:
        return self._draining

    def load_snapshot(self) -> LoadSnapshot:
        """This worker's load now, for the in-band report (cheap: called per response)."""
        running = waiting = slots = 0
        kv = 0.0
        for slot in self._slots.values():
            if slot.backend is None:
                continue
            bl = slot.backend.load_report()
            running += bl.running
            waiting += bl.waiting
            slots += bl.capacity
            kv = max(kv, bl.kv_cache_use)
        return LoadSnapshot(
            inflight=self._inflight,
            running=running,
            queue_depth=waiting,
            capacity=self.capacity,
            slots=min(slots, self.capacity) if slots else self.capacity,
            kv_cache_use=kv,
            produced_at_ms=int(time.time() * 1000),
        )

    def start_draining(self) -> None:
        self._draining = True
        self._notify()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- serving -------------------------------------------------------------
    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateChunk]:
        """Admit and run one Generate request; closing the stream stops the engine."""
        with self._admit(request.model, ModelKind.GENERATE, request.request_id) as backend:
            assert isinstance(backend, GenerateBackend)  # checked at load (_check_kind)
            start = time.perf_counter()
            first: float | None = None
            tokens = 0
            queue_s = 0.0
            finished = False
            stream = backend.generate(request)
            try:
                async for chunk in stream:
                    if first is None:
                        first = time.perf_counter() - start
                    tokens += len(chunk.token_ids)
                    if chunk.finish is not None:
                        queue_s, finished = chunk.queue_s, True
                    yield chunk
            finally:
                await stream.aclose()  # type: ignore[attr-defined]  # async generators
                self.observer.generated(
                    Generation(
                        request.model,
                        request.request_id,
                        tokens,
                        queue_s,
                        first,
                        time.perf_counter() - start,
                        finished,
                    )
                )

    async def infer(self, request: InferInput) -> InferOutput:
        with self._admit(request.model, ModelKind.INFER, request.request_id) as backend:
            assert isinstance(backend, InferBackend)  # checked at load (_check_kind)
            return await backend.infer(request)

    @contextmanager
    def _admit(self, model: str, kind: ModelKind, request_id: str) -> Iterator[Backend]:
        """Check the request can run here and count it in flight while it does."""
        if self._draining:
            raise Unavailable(
                "worker is draining; retry on another worker", reason=Reason.WORKER_DRAINING
            )
        slot = self._slots.get(model)
        if slot is None:
            names = ", ".join(sorted(self._slots)) or "none"
            raise NotFound(
                f"model {model!r} is not served here (models: {names})",
                metadata={"model": model},
                field="model",
            )
        if slot.spec.kind is not kind:
            rpc = "Generate" if slot.spec.kind is ModelKind.GENERATE else "Infer"
            raise InvalidArgument(
                f"model {model!r} is a {slot.spec.kind.value} model: call {rpc}",
                reason=Reason.WRONG_RPC,
                field="model",
            )
        if slot.state is not ModelState.READY or slot.backend is None:
            detail = f": {slot.error}" if slot.error else ""
            raise Unavailable(
                f"model {model!r} is {slot.state.value}{detail}",
                reason=Reason.MODEL_NOT_READY,
                metadata={"model": model, "state": slot.state.value},
                retry_after_s=5.0 if slot.state is ModelState.LOADING else None,
            )
        if self._inflight >= self.capacity:
            raise ResourceExhausted(
                f"worker at capacity ({self.capacity} requests in flight); retry later"
            )
        limit = slot.spec.max_concurrency
        if limit and slot.inflight >= limit:
            raise ResourceExhausted(
                f"model {model!r} at its concurrency limit ({limit}) here",
                reason=Reason.MODEL_AT_CAPACITY,
            )
        slot.requests[request_id] = slot.requests.get(request_id, 0) + 1
        slot.inflight += 1
        self._inflight += 1
        self._idle.clear()
        try:
            yield slot.backend
        finally:
            n = slot.requests.pop(request_id) - 1
            if n:  # the same id twice at once (a client reusing ids)
                slot.requests[request_id] = n
            slot.inflight -= 1
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
