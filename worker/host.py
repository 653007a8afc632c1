"""The models a worker hosts: specs, backends, states and in-flight accounting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from meshserve.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from meshserve.load import LoadSnapshot
from meshserve.vocab import Device, ModelKind, ModelState
from worker.backends.base import Backend
from worker.types import ModelSpec, ModelStatus

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelSpec], Backend]


@dataclass
class _Slot:
    spec: ModelSpec
    backend: Backend | None = None
    state: ModelState = ModelState.LOADING
    error: str = ""
    inflight: int = 0


@dataclass
class ModelHost:
    """Owns the backends of one worker. Knows nothing of gRPC or etcd."""

    device: Device
    capacity: int
    factory: BackendFactory
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
            try:
                backend = self.factory(slot.spec)
                await backend.load(self.device)
            except Exception as exc:  # an engine can fail in any way; keep serving the rest
                log.exception("model %s failed to load", slot.spec.name)
                slot.state, slot.error = ModelState.FAILED, f"{type(exc).__name__}: {exc}"
            else:
                slot.backend, slot.state = backend, ModelState.READY
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

    def add_listener(self, cb: Callable[[], None]) -> None:
        self._listeners.append(cb)

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    # -- queries -------------------------------------------------------------
    def statuses(self) -> list[ModelStatus]:
        return [ModelStatus(s.spec, s.state, s.error) for s in self._slots.values()]

    def model_slots(self, name: str) -> int:
        """Requests the model runs concurrently at full speed (0: not known)."""
        slot = self._slots[name]
        report = getattr(slot.backend, "load_report", None)
        if report is not None:
            return int(report().capacity)
        return slot.spec.max_concurrency

    def model_kv_tokens(self, name: str) -> int:
        """KV-cache capacity of the model in tokens (0: not known)."""
        report = getattr(self._slots[name].backend, "load_report", None)
        return int(report().kv_cache_tokens) if report is not None else 0

    def model_max_sequence(self, name: str) -> int:
        """Longest prompt + completion the model takes here (0: not known)."""
        value = getattr(self._slots[name].backend, "max_sequence_len", 0)
        return int(value) if isinstance(value, int) else 0

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
            # Engines that can tell their queue implement load_report(); the
            # others count as running whatever the host admitted.
            report = getattr(slot.backend, "load_report", None)
            if report is not None:
                bl = report()
                running += bl.running
                waiting += bl.waiting
                slots += bl.capacity
                kv = max(kv, bl.kv_cache_use)
            else:
                running += slot.inflight
                slots += slot.spec.max_concurrency
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

    # -- admission -----------------------------------------------------------
    @contextmanager
    def admit(self, model: str, kind: ModelKind) -> Iterator[Backend]:
        """Check the request can run here and count it in flight while it does."""
        if self._draining:
            raise Unavailable("worker is draining; retry on another worker")
        slot = self._slots.get(model)
        if slot is None:
            names = ", ".join(sorted(self._slots)) or "none"
            raise NotFound(f"model {model!r} is not served here (models: {names})")
        if slot.spec.kind is not kind:
            rpc = "Generate" if slot.spec.kind is ModelKind.GENERATE else "Infer"
            raise InvalidArgument(f"model {model!r} is a {slot.spec.kind.value} model: call {rpc}")
        if slot.state is not ModelState.READY or slot.backend is None:
            detail = f": {slot.error}" if slot.error else ""
            raise Unavailable(f"model {model!r} is {slot.state.value}{detail}")
        if self._inflight >= self.capacity:
            raise ResourceExhausted(
                f"worker at capacity ({self.capacity} requests in flight); retry later"
            )
        if slot.spec.max_concurrency and slot.inflight >= slot.spec.max_concurrency:
            raise ResourceExhausted(
                f"model {model!r} at its concurrency limit ({slot.spec.max_concurrency}) here"
            )
        slot.inflight += 1
        self._inflight += 1
        self._idle.clear()
        try:
            yield slot.backend
        finally:
            slot.inflight -= 1
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
