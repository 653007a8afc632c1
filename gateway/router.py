"""Mechanism: pick a worker (through the policy), forward, fail over before the first
response, queue when every worker is full, and feed load and latency back.

One dispatch loop (`_start`: choose -> send -> retry before the first response) serves
Generate and Infer alike, over the `Transport` the router declares; `_settle` and
`_done` account for a call once it ends. A stream resumed on another worker later
(migration) is one more `_start` with the workers already tried.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from gateway.admission import AdmissionQueue
from gateway.observe import NO_ATTEMPT, NO_ROUTER_OBSERVER, AttemptHook, RouterObserver
from gateway.routing import (
    FleetView,
    NoWatch,
    Policies,
    StreamWatch,
    no_worker_error,
)
from gateway.scheduler.types import RequestFacts
from gateway.stats import Candidates, WorkerStats, fitting, longest_fit
from gateway.transport import CallHandle, Metadata, Method, Trailers, Transport
from meshserve import load
from meshserve.errors import (
    ErrorCode,
    MeshError,
)
from registry.records import WorkerRecord

log = logging.getLogger(__name__)

TimeRemaining = Callable[[], float | None]


@dataclass(slots=True)
class Attempt:
    """A call that reached its first response on one worker."""

    worker: WorkerRecord
    handle: CallHandle
    first: bytes | None  # None: the call ended without a message
    started: float
    ttft: float
    hook: AttemptHook


class Router:
    def __init__(
        self,
        *,
        fleet: FleetView,
        transport: Transport,
        policies: Policies,
        admission: AdmissionQueue | None = None,
        watch: StreamWatch | None = None,
        observer: RouterObserver = NO_ROUTER_OBSERVER,
        retries: int = 1,
        eject_s: float = 5.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._view = fleet
        self._transport = transport
        self.policies = policies
        self.admission = admission or AdmissionQueue()
        self._watch = watch or NoWatch()
        self._obs = observer
        # Telemetry off (the default): no hook is called at all on the per-call path.
        self._observed = observer is not NO_ROUTER_OBSERVER
        self._retries = retries
        self._eject_s = eject_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._stats: dict[str, WorkerStats] = {}
        self._ejected_until: dict[str, float] = {}
        self._ready: dict[str, list[WorkerRecord]] = {}
        self._ready_ids: dict[str, tuple[str, ...]] = {}
        self._longest_fit: dict[str, int] = {}  # per model: what every ready worker takes
        fleet.add_listener(self.on_view_change)

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

    def ejected(self, worker_id: str) -> bool:
        """Whether the worker answered UNAVAILABLE lately (a last resort only)."""
        return self._ejected_until.get(worker_id, 0.0) > self._clock()

    def no_worker(self, model: str) -> MeshError:
        """The error a call for `model` gets when no worker can take it."""
        return self._no_worker(model, False)

    def known_stats(self, worker_id: str) -> WorkerStats | None:
        """This gateway's measurements of a worker, if it has any (never creates them)."""
        return self._stats.get(worker_id)

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
        alias = self._view.aliases.get(model)
        return model if alias is None else alias.pick(self._rng)

    def rank(self, facts: RequestFacts, exclude: set[str]) -> list[WorkerRecord]:
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
        policy = self.policies.get(facts.policy) if facts.policy else self.policies.default
        pool_ids = None
        if pool is self._ready.get(model):  # the common case: reuse the cached id tuple
            pool_ids = self._ready_ids.get(model)
            if pool_ids is None:
                pool_ids = self._ready_ids[model] = tuple(w.worker_id for w in pool)
        cands = Candidates(pool, self.stats, model, now, pool_ids)
        ids = policy.rank(facts, cands, self._rng)
        workers = self._view.workers
        return [workers[i] for i in ids if i in workers]

    def ready(self, model: str) -> list[WorkerRecord]:
        """The workers serving `model` now (READY, not draining)."""
        return self._ready_for(model)

    def now(self) -> float:
        """The router's clock (the one its measurements are timed with)."""
        return self._clock()

    def _no_worker(self, model: str, tried: bool) -> MeshError:
        return no_worker_error(self._view, model, tried)

    def _choose_now(
        self, facts: RequestFacts, tried: set[str], last: MeshError | None
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
        facts: RequestFacts,
        tried: set[str],
        last: MeshError | None,
        time_remaining: TimeRemaining,
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

            start = self._clock()
            try:
                await self.admission.wait_turn(facts.model, facts.priority, time_remaining(), room)
            except MeshError as err:
                self._obs.queued(facts, self._clock() - start, err)
                raise
            self._obs.queued(facts, self._clock() - start, None)
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

    # -- accounting ----------------------------------------------------------
    def _failed(self, worker: WorkerRecord, err: MeshError) -> None:
        if err.worker_fault:
            self.stats(worker.worker_id).on_failure()
        if err.code is ErrorCode.UNAVAILABLE:
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

    def _settle(self, att: Attempt, facts: RequestFacts, md: Trailers) -> bool:
        """Apply an ended call's trailer: its load report and what the call cost.

        The worker's own figures (engine time per unit of work, no queueing, no
        network) are what the policy needs to compare workers' speeds; without
        them, the call's duration per expected unit is the fallback."""
        report, cost = load.find_with_cost(md)
        st = self.stats(att.worker.worker_id)
        now = self._clock()
        if cost is not None:
            st.on_success(facts.model, cost.service_s, cost.work, att.ttft, now)
        else:
            st.on_success(facts.model, now - att.started, facts.size_hint, att.ttft, now)
        if self._observed:
            self._obs.finished(facts, att.worker.worker_id, cost, att.ttft, now - att.started)
            att.hook.ended(None)
        if report is None:
            return False
        st.on_report(report, now)
        return True

    # -- the dispatch loop ---------------------------------------------------
    async def _start(
        self,
        method: Method,
        facts: RequestFacts,
        payload: bytes,
        time_remaining: TimeRemaining,
        metadata: Metadata,
        tried: set[str],
    ) -> Attempt:
        """Choose a worker, send, and wait for the first response; on a retryable
        failure before it, the same on another worker (at most `retries` more)."""
        last: MeshError | None = None
        for attempt in range(self._retries + 1):
            t0 = self._clock()
            choice = self._choose_now(facts, tried, last)
            decided = self._clock() - t0
            if isinstance(choice, list):  # every worker is full: queue (a coroutine)
                choice = await self._wait_for_room(facts, tried, last, time_remaining, choice)
            worker = choice
            if self._observed:
                self._obs.picked(facts, worker.worker_id, decided)
                hook, md = self._obs.attempt(facts, worker.worker_id, metadata)
            else:
                hook, md = NO_ATTEMPT, metadata
            self.stats(worker.worker_id).on_send()
            start = self._clock()
            handle = self._transport.call(
                method, worker, payload, timeout=time_remaining(), metadata=md
            )
            try:
                first = await handle.read()
            except MeshError as err:
                self._failed(worker, err)
                self._done(worker, facts.model)
                handle.cancel()
                hook.ended(err)
                last = err
                if err.retryable and attempt < self._retries:
                    log.info("retrying %s elsewhere: %s", facts.request_id, err.code.value)
                    self._obs.retried(facts, worker.worker_id, err)
                    continue
                raise
            except BaseException:  # cancelled while waiting: the client went away
                self._done(worker, facts.model)
                handle.cancel()
                hook.ended(None)
                raise
            ttft = self._clock() - start
            if self._observed:
                hook.first_response(ttft)
            return Attempt(worker, handle, first, start, ttft, hook)
        assert last is not None  # the loop runs at least once and returns or raises
        raise last

    async def generate(
        self,
        facts: RequestFacts,
        payload: bytes,
        *,
        time_remaining: TimeRemaining,
        metadata: Metadata,
        on_commit: Callable[[str], None],
    ) -> AsyncGenerator[bytes, None]:
        """Relay a Generate stream. Fails over only before the first message."""
        att = await self._start(Method.GENERATE, facts, payload, time_remaining, metadata, set())
        worker, handle = att.worker, att.handle
        reported = False
        self._watch.stream_started(worker.worker_id, worker.address)
        try:
            on_commit(worker.worker_id)
            if att.first is not None:
                yield att.first
                read, end = handle.raw_read, handle.end
                while (msg := await read()) is not end:
                    yield msg  # type: ignore[misc]  # bytes until `end`
            reported = self._settle(att, facts, await handle.trailers())
        except MeshError as err:
            self._failed(worker, err)
            att.hook.ended(err)
            raise
        except Exception as exc:  # the transport's own failure, from raw_read
            mapped = handle.translate(exc)
            if mapped is None:
                raise
            self._failed(worker, mapped)
            att.hook.ended(mapped)
            raise mapped from exc
        except BaseException:  # cancelled: the client went away
            att.hook.ended(None)
            raise
        finally:
            self._watch.stream_ended(worker.worker_id)
            self._done(worker, facts.model, reported)
            handle.cancel()  # no-op when finished; stops the worker when we are cancelled

    async def infer(
        self,
        facts: RequestFacts,
        payload: bytes,
        *,
        time_remaining: TimeRemaining,
        metadata: Metadata,
    ) -> tuple[bytes, str]:
        """Forward one Infer call; returns the worker's response bytes and its id."""
        att = await self._start(Method.INFER, facts, payload, time_remaining, metadata, set())
        reported = False
        try:
            reported = self._settle(att, facts, await att.handle.trailers())
        except BaseException:
            att.hook.ended(None)
            raise
        finally:
            self._done(att.worker, facts.model, reported)
        return att.first or b"", att.worker.worker_id
