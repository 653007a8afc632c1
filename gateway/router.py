"""Mechanism: pick a worker, forward, fail over before the first response, account."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from gateway.forwarder import Forwarder
from gateway.scheduler import Candidate, least_inflight
from meshserve.errors import MeshError, NotFound, Unavailable
from meshserve.status import from_rpc_error
from registry.records import WorkerRecord
from registry.view import RegistryView

log = logging.getLogger(__name__)

# Worker answers after which another worker may well succeed. Client errors
# (INVALID_ARGUMENT, ...) are final and never count against the worker.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,  # our view was stale: the worker no longer has it
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ABORTED,
    }
)


@dataclass(frozen=True)
class RoutingFacts:
    """What routing reads from a request; the payload itself is never re-encoded."""

    model: str
    request_id: str
    session_id: str = ""
    priority: int = 0


class Router:
    def __init__(
        self,
        view: RegistryView,
        forwarder: Forwarder,
        *,
        retries: int = 1,
        eject_s: float = 5.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._view = view
        self._fwd = forwarder
        self._retries = retries
        self._eject_s = eject_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._inflight: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}

    def inflight(self, worker_id: str) -> int:
        return self._inflight.get(worker_id, 0)

    def rank(self, model: str, exclude: set[str]) -> list[WorkerRecord]:
        """Workers for `model`, best first; raises NotFound / Unavailable with the reason."""
        workers = self._view.workers
        ready = [w for w in self._view.ready_for(model) if w.worker_id not in exclude]
        if not ready:
            if not any(w.model(model) for w in workers.values()):
                known = ", ".join(sorted(self._view.models())) or "none"
                raise NotFound(f"model {model!r} is not served by any worker (models: {known})")
            states = sorted(
                f"{w.worker_id}={m.state.value}{'/draining' if w.state.value == 'draining' else ''}"
                for w in workers.values()
                if (m := w.model(model)) is not None
            )
            why = "all tried" if exclude else "none ready"
            raise Unavailable(f"no worker can serve {model!r} now ({why}: {', '.join(states)})")
        now = self._clock()
        healthy = [w for w in ready if self._ejected_until.get(w.worker_id, 0.0) <= now]
        pool = healthy or ready  # ejected workers are a last resort, not a dead end
        by_id = {w.worker_id: w for w in pool}
        cands = [Candidate(w.worker_id, self.inflight(w.worker_id), w.capacity) for w in pool]
        return [by_id[wid] for wid in least_inflight(cands, self._rng)]

    def _next(self, model: str, tried: set[str], last: MeshError | None) -> WorkerRecord:
        """The best untried worker; on a retry with none left, the previous error stands."""
        try:
            worker = self.rank(model, tried)[0]
        except MeshError:
            if last is not None:
                raise last from None
            raise
        tried.add(worker.worker_id)
        return worker

    def _failed(self, worker: WorkerRecord, code: grpc.StatusCode) -> None:
        if code == grpc.StatusCode.UNAVAILABLE:
            self._ejected_until[worker.worker_id] = self._clock() + self._eject_s

    def _enter(self, worker_id: str) -> None:
        self._inflight[worker_id] = self._inflight.get(worker_id, 0) + 1

    def _leave(self, worker_id: str) -> None:
        n = self._inflight.get(worker_id, 0) - 1
        if n > 0:
            self._inflight[worker_id] = n
        else:
            self._inflight.pop(worker_id, None)

    async def generate(
        self,
        facts: RoutingFacts,
        payload: bytes,
        *,
        time_remaining: Callable[[], float | None],
        metadata: tuple[tuple[str, str], ...],
        on_commit: Callable[[str], Awaitable[None]],
    ) -> AsyncIterator[bytes]:
        """Relay a Generate stream. Fails over only before the first message."""
        tried: set[str] = set()
        last: MeshError | None = None
        for attempt in range(self._retries + 1):
            worker = self._next(facts.model, tried, last)
            self._enter(worker.worker_id)
            call = self._fwd.generate(
                worker.worker_id,
                worker.address,
                payload,
                timeout=time_remaining(),
                metadata=metadata,
            )
            try:
                try:
                    first = await call.read()
                except grpc.aio.AioRpcError as exc:
                    self._failed(worker, exc.code())
                    last = from_rpc_error(exc, peer=worker.worker_id)
                    if exc.code() in _RETRYABLE and attempt < self._retries:
                        log.info("retrying %s elsewhere: %s", facts.request_id, exc.code().name)
                        continue
                    raise last from exc
                await on_commit(worker.worker_id)
                msg = first
                try:
                    while msg is not grpc.aio.EOF:
                        yield msg
                        msg = await call.read()
                except grpc.aio.AioRpcError as exc:
                    self._failed(worker, exc.code())
                    raise from_rpc_error(exc, peer=worker.worker_id) from exc
                return
            finally:
                self._leave(worker.worker_id)
                call.cancel()  # no-op when finished; stops the worker when we are cancelled
        assert last is not None
        raise last

    async def infer(
        self,
        facts: RoutingFacts,
        payload: bytes,
        *,
        time_remaining: Callable[[], float | None],
        metadata: tuple[tuple[str, str], ...],
    ) -> tuple[bytes, str]:
        """Forward one Infer call; returns the worker's response bytes and its id."""
        tried: set[str] = set()
        last: MeshError | None = None
        for attempt in range(self._retries + 1):
            worker = self._next(facts.model, tried, last)
            self._enter(worker.worker_id)
            try:
                call = self._fwd.infer(
                    worker.worker_id,
                    worker.address,
                    payload,
                    timeout=time_remaining(),
                    metadata=metadata,
                )
                resp: bytes = await call
                return resp, worker.worker_id
            except grpc.aio.AioRpcError as exc:
                self._failed(worker, exc.code())
                last = from_rpc_error(exc, peer=worker.worker_id)
                if exc.code() in _RETRYABLE and attempt < self._retries:
                    continue
                raise last from exc
            finally:
                self._leave(worker.worker_id)
        assert last is not None
        raise last
