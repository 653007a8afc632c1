"""Mechanism: pick a worker (through the policy), forward, fail over before the first
response, queue when every worker is full, and feed load and latency back."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from gateway.admission import AdmissionQueue
from gateway.forwarder import Forwarder
from gateway.loadwatch import LoadWatcher
from gateway.scheduler.types import Policy, RequestFacts
from gateway.stats import Candidates, WorkerStats, fitting, longest_fit
from meshserve import load
from meshserve.errors import InvalidArgument, MeshError, NotFound, Unavailable
from meshserve.status import from_rpc_error
from meshserve.vocab import WorkerState
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
# Failures that say something about the worker's health (not the request's).
_WORKER_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RoutingFacts:
    """What routing reads from a request; the payload itself is never re-encoded."""

    model: str
    request_id: str
    session_id: str = ""
    priority: int = 0
    size_hint: float = 1.0
    policy: str = ""  # per-request override of the gateway's policy ("" = default)
    min_tokens: int = 0  # prompt + completion tokens the request needs at least


class Router:
    def __init__(
        self,
        view: RegistryView,
        forwarder: Forwarder,
        policy: Policy,
        *,
        retries: int = 1,
        eject_s: float = 5.0,
        admission: AdmissionQueue | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._view = view
        self._fwd = forwarder
        self.policy = policy
        self._policies: dict[str, Policy] = {}  # per-request overrides, built on first use
        self.policy_factory: Callable[[str], Policy] | None = None
        self._retries = retries
        self._eject_s = eject_s
        self.admission = admission or AdmissionQueue()
        self._rng = rng or random.Random()
        self._clock = clock
        self._stats: dict[str, WorkerStats] = {}
        self._ejected_until: dict[str, float] = {}
        self._ready: dict[str, list[WorkerRecord]] = {}
        self._ready_ids: dict[str, tuple[str, ...]] = {}
        self._longest_fit: dict[str, int] = {}  # per model: what every ready worker takes
        self.loadwatch: LoadWatcher | None = None  # set by the gateway: load during streams
        add_listener = getattr(view, "add_listener", None)
        if add_listener is not None:
            add_listener(self.on_view_change)

    # -- state ---------------------------------------------------------------
    def on_view_change(self) -> None:
        self._ready.clear()
        self._ready_ids.clear()
        self._longest_fit.clear()
        live = self._view.workers
        for wid in [w for w in self._stats if w not in live]:
            del self._stats[wid]
        self.admission.notify()  # a new worker may be room for queued calls

    def stats(self, worker_id: str) -> WorkerStats:
        st = self._stats.get(worker_id)
        if st is None:
            st = self._stats[worker_id] = WorkerStats()
        return st

    def inflight(self, worker_id: str) -> int:
        st = self._stats.get(worker_id)
        return st.inflight if st else 0

    def _ready_for(self, model: str) -> list[WorkerRecord]:
        ready = self._ready.get(model)
        if ready is None:
            ready = self._ready[model] = self._view.ready_for(model)
            self._longest_fit[model] = longest_fit(ready, model)
        return ready

    def _has_room(self, w: WorkerRecord) -> bool:
        st = self._stats.get(w.worker_id)
        if st is None or w.capacity <= 0:
            return True
        return st.reported_inflight + st.sent_since_report < w.capacity

    # -- choosing ------------------------------------------------------------
    def resolve(self, model: str) -> str:
        """The model to route to: an alias picks one of its targets by weight."""
        alias = getattr(self._view, "aliases", {}).get(model)
        return model if alias is None else alias.pick(self._rng)

    def rank(self, facts: RoutingFacts, exclude: set[str]) -> list[WorkerRecord]:
        """Workers for the request, best first; NotFound / Unavailable with the reason."""
        model = facts.model
        ready = self._ready_for(model)
        if exclude:
            ready = [w for w in ready if w.worker_id not in exclude]
        if not ready:
            raise self._no_worker(model, bool(exclude))
        now = self._clock()
        pool = ready
        if self._ejected_until:
            healthy = [w for w in ready if self._ejected_until.get(w.worker_id, 0.0) <= now]
            pool = healthy or ready  # ejected workers are a last resort, not a dead end
        if facts.min_tokens > self._longest_fit.get(model, 0):  # O(1) unless some are short
            pool = fitting(pool, model, facts.min_tokens) or pool
        request = RequestFacts(model, facts.session_id, facts.priority, facts.size_hint)
        policy = self._policy_for(facts.policy) if facts.policy else self.policy
        pool_ids = None
        if pool is self._ready.get(model):  # the common case: reuse the cached id tuple
            pool_ids = self._ready_ids.get(model)
            if pool_ids is None:
                pool_ids = self._ready_ids[model] = tuple(w.worker_id for w in pool)
        cands = Candidates(pool, self.stats, model, now, pool_ids)
        ids = policy.rank(request, cands, self._rng)
        workers = self._view.workers
        return [workers[i] for i in ids if i in workers]

    def _policy_for(self, name: str) -> Policy:
        if not name or self.policy_factory is None:
            return self.policy
        policy = self._policies.get(name)
        if policy is None:
            try:
                policy = self.policy_factory(name)
            except (KeyError, ValueError) as exc:
                raise InvalidArgument(f"unknown routing policy {name!r}: {exc}") from None
            self._policies[name] = policy
        return policy

    def _no_worker(self, model: str, tried: bool) -> MeshError:
        workers = self._view.workers
        if not any(w.model(model) for w in workers.values()):
            known = ", ".join(sorted(self._view.models())) or "none"
            return NotFound(f"model {model!r} is not served by any worker (models: {known})")
        states = sorted(
            f"{w.worker_id}={m.state.value}"
            + ("/draining" if w.state is WorkerState.DRAINING else "")
            for w in workers.values()
            if (m := w.model(model)) is not None
        )
        why = "all tried" if tried else "none ready"
        return Unavailable(f"no worker can serve {model!r} now ({why}: {', '.join(states)})")

    def _choose_now(
        self, facts: RoutingFacts, tried: set[str], last: MeshError | None
    ) -> WorkerRecord | list[WorkerRecord]:
        """The best untried worker if it has room and nobody is queued (the common
        case, decided without a coroutine), else the ranking for `_wait_for_room`."""
        try:
            ranked = self.rank(facts, tried)
        except MeshError:
            if last is not None:
                raise last from None  # on a retry with none left, the first error stands
            raise
        if not ranked:
            raise self._no_worker(facts.model, bool(tried))
        worker = ranked[0]
        if self._has_room(worker) and not self.admission.waiting:
            tried.add(worker.worker_id)
            return worker
        return ranked

    async def _wait_for_room(
        self,
        facts: RoutingFacts,
        tried: set[str],
        last: MeshError | None,
        time_remaining: Callable[[], float | None],
        ranked: list[WorkerRecord],
    ) -> WorkerRecord:
        """The choice when the policy's pick is full or calls are queued: wait for room
        (never past the deadline), then the best worker with room."""
        while True:
            roomy = next((w for w in ranked if self._has_room(w)), None)
            if roomy is None:  # the policy may have sampled: look at the whole pool
                roomy = next(
                    (
                        w
                        for w in self._ready_for(facts.model)
                        if w.worker_id not in tried and self._has_room(w)
                    ),
                    None,
                )
            if roomy is not None and not self.admission.waiting:
                worker = roomy
                break

            def room() -> bool:
                return any(self._has_room(w) for w in self._ready_for(facts.model))

            await self.admission.wait_turn(facts.model, facts.priority, time_remaining(), room)
            # Rank again with what we know now.
            if room():
                ranked = self.rank(facts, tried)
                worker = next((w for w in ranked if self._has_room(w)), ranked[0])
                break
            choice = self._choose_now(facts, tried, last)
            if not isinstance(choice, list):
                return choice
            ranked = choice
        tried.add(worker.worker_id)
        return worker

    def _failed(self, worker: WorkerRecord, code: grpc.StatusCode) -> None:
        if code in _WORKER_FAULTS:
            self.stats(worker.worker_id).on_failure()
        if code == grpc.StatusCode.UNAVAILABLE:
            self._ejected_until[worker.worker_id] = self._clock() + self._eject_s

    def _done(self, worker: WorkerRecord, model: str, reported: bool = False) -> None:
        self.stats(worker.worker_id).on_done(reported)
        if self._ejected_until:
            now = self._clock()
            for wid in [w for w, t in self._ejected_until.items() if t <= now]:
                del self._ejected_until[wid]
        if self.admission.waiting:
            self.admission.notify(model)

    def on_streamed_report(self, worker_id: str, report: load.LoadSnapshot) -> None:
        if worker_id in self._view.workers:
            self.stats(worker_id).on_report(report, self._clock())

    def _finish(
        self, worker: WorkerRecord, facts: RoutingFacts, md: object, elapsed: float,
        ttft: float | None,
    ) -> bool:  # fmt: skip
        """Apply a call's trailer: its load report and what the call cost.

        The worker's own figures (engine time per unit of work, no queueing, no
        network) are what the policy needs to compare workers' speeds; without
        them, the call's duration per expected unit is the fallback."""
        report, cost = load.find_with_cost(md)  # type: ignore[arg-type]
        st = self.stats(worker.worker_id)
        now = self._clock()
        if cost is not None:
            st.on_success(facts.model, cost.service_s, cost.work, ttft, now)
        else:
            st.on_success(facts.model, elapsed, facts.size_hint, ttft, now)
        if report is None:
            return False
        st.on_report(report, now)
        return True

    # -- forwarding ----------------------------------------------------------
    async def generate(
        self,
        facts: RoutingFacts,
        payload: bytes,
        *,
        time_remaining: Callable[[], float | None],
        metadata: Metadata,
        on_commit: Callable[[str], Awaitable[None]],
    ) -> AsyncIterator[bytes]:
        """Relay a Generate stream. Fails over only before the first message."""
        tried: set[str] = set()
        last: MeshError | None = None
        for attempt in range(self._retries + 1):
            choice = self._choose_now(facts, tried, last)
            if isinstance(choice, list):  # every worker is full: queue (a coroutine)
                choice = await self._wait_for_room(facts, tried, last, time_remaining, choice)
            worker = choice
            st = self.stats(worker.worker_id)
            st.on_send()
            start = self._clock()
            reported = watching = False
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
                ttft = self._clock() - start
                if self.loadwatch is not None:
                    self.loadwatch.stream_started(worker.worker_id, worker.address)
                    watching = True
                await on_commit(worker.worker_id)
                msg = first
                try:
                    while msg is not grpc.aio.EOF:
                        yield msg
                        msg = await call.read()
                except grpc.aio.AioRpcError as exc:
                    self._failed(worker, exc.code())
                    raise from_rpc_error(exc, peer=worker.worker_id) from exc
                md = await call.trailing_metadata()
                reported = self._finish(worker, facts, md, self._clock() - start, ttft)
                return
            finally:
                if watching and self.loadwatch is not None:
                    self.loadwatch.stream_ended(worker.worker_id)
                self._done(worker, facts.model, reported)
                call.cancel()  # no-op when finished; stops the worker when we are cancelled
        assert last is not None
        raise last

    async def infer(
        self,
        facts: RoutingFacts,
        payload: bytes,
        *,
        time_remaining: Callable[[], float | None],
        metadata: Metadata,
    ) -> tuple[bytes, str]:
        """Forward one Infer call; returns the worker's response bytes and its id."""
        tried: set[str] = set()
        last: MeshError | None = None
        for attempt in range(self._retries + 1):
            choice = self._choose_now(facts, tried, last)
            if isinstance(choice, list):
                choice = await self._wait_for_room(facts, tried, last, time_remaining, choice)
            worker = choice
            self.stats(worker.worker_id).on_send()
            start = self._clock()
            reported = False
            try:
                call = self._fwd.infer(
                    worker.worker_id,
                    worker.address,
                    payload,
                    timeout=time_remaining(),
                    metadata=metadata,
                )
                resp: bytes = await call
                md = await call.trailing_metadata()
                reported = self._finish(worker, facts, md, self._clock() - start, None)
                return resp, worker.worker_id
            except grpc.aio.AioRpcError as exc:
                self._failed(worker, exc.code())
                last = from_rpc_error(exc, peer=worker.worker_id)
                if exc.code() in _RETRYABLE and attempt < self._retries:
                    continue
                raise last from exc
            finally:
                self._done(worker, facts.model, reported)
        assert last is not None
        raise last
