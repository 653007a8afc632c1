"""Mechanism: pick a worker (through the policy), forward, fail over before the first
response, queue when every worker is full, and feed load and latency back.

One dispatch loop (`_start`: choose -> send -> retry before the first response) serves
Generate and Infer alike, over the `Transport` the router declares; `_settle` and
`_done` account for a call once it ends. A stream resumed on another worker later
(migration) is one more `_start` with the workers already tried, sent with the tokens
the stream delivered as its continuation.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from gateway.admission import AdmissionQueue
from gateway.choosing import Chooser, TimeRemaining
from gateway.observe import NO_ATTEMPT, NO_ROUTER_OBSERVER, AttemptHook, RouterObserver
from gateway.outliers import Outliers
from gateway.retry_budget import RetryBudget
from gateway.routing import (
    FleetView,
    NoWatch,
    Policies,
    StreamWatch,
)
from gateway.scheduler.types import RequestFacts
from gateway.stats import WorkerStats
from gateway.transport import (
    FOLD_AFTER,
    CallHandle,
    Metadata,
    Method,
    Resumable,
    Trailers,
    Transport,
)
from meshserve import load
from meshserve.errors import DeadlineExceeded, MeshError, Reason, Unavailable
from registry.records import WorkerRecord

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Attempt:
    """A call that reached its first response on one worker."""

    worker: WorkerRecord
    stats: WorkerStats  # where the call is counted in flight
    handle: CallHandle
    first: bytes | None  # None: the call ended without a message
    started: float
    ttft: float
    hook: AttemptHook


class Router(Chooser):
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
        budget: RetryBudget | None = None,
        eject_s: float = 5.0,
        max_timeouts: int = 3,
        max_call_s: float | None = None,
        max_migrations: int = 3,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        rng = rng or random.Random()
        outliers = Outliers(clock=clock, eject_s=eject_s, max_timeouts=max_timeouts)
        super().__init__(
            fleet=fleet,
            policies=policies,
            admission=admission or AdmissionQueue(),
            observer=observer,
            outliers=outliers,
            rng=rng,
            clock=clock,
        )
        self._transport = transport
        self._watch = watch or NoWatch()
        # Telemetry off (the default): no hook is called at all on the per-call path.
        self._observed = observer is not NO_ROUTER_OBSERVER
        self._retries = retries
        self.budget = budget or RetryBudget(clock=clock)
        # A call without a deadline still gets one: nothing waits on a worker forever.
        self._max_call_s = max_call_s
        self._max_migrations = max_migrations
        fleet.add_listener(self.on_view_change)

    @property
    def migrates(self) -> bool:
        """Whether streams move to another worker when theirs fails mid-stream."""
        return self._max_migrations > 0

    # -- state ---------------------------------------------------------------
    def on_view_change(self) -> None:
        self._ready.clear()
        self._ready_ids.clear()
        self._longest_fit.clear()
        live = self._view.workers
        for wid in [w for w in self._stats if w not in live]:
            del self._stats[wid]
        self.outliers.forget(set(live))
        self.admission.notify()  # a new worker may be room for queued calls

    # -- accounting ----------------------------------------------------------
    def _failed(self, worker: WorkerRecord, err: MeshError) -> None:
        if err.worker_fault:
            self.stats(worker.worker_id).on_failure()
        if self.outliers.failed(worker.worker_id, err):
            log.warning("worker %s ejected for a while: %s", worker.worker_id, err.message)
            self._obs.ejected(worker.worker_id, err)

    def _done(self, st: WorkerStats, model: str, reported: bool = False) -> None:
        # `st`: the stats the call was counted in at its send. A worker that left the view
        # and came back under the same id has new stats, which this call never entered.
        st.on_done(reported)
        if self.outliers:
            self.outliers.expire()
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
        self.outliers.succeeded(att.worker.worker_id)
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

    def _timeout(
        self, remaining: float | None, facts: RequestFacts, worker: WorkerRecord
    ) -> float | None:
        """The worker's deadline: the caller's, or the gateway's limit without one. A
        call whose deadline already passed is not sent at all."""
        if remaining is None:
            return self._max_call_s
        if remaining <= 0.0:
            raise DeadlineExceeded(
                "the call's deadline passed before a worker could take it",
                metadata={"model": facts.model},
            )
        return remaining

    def _retry_allowed(self, facts: RequestFacts, err: MeshError) -> bool:
        if self.budget.try_retry():
            return True
        log.warning("retry budget spent: %s fails without a retry", facts.request_id)
        self._obs.retry_refused(facts, err)
        return False

    # -- the dispatch loop ---------------------------------------------------
    async def _start(
        self,
        method: Method,
        facts: RequestFacts,
        payload: bytes,
        time_remaining: TimeRemaining,
        metadata: Metadata,
        tried: set[str],
        *,
        new: bool = True,
    ) -> Attempt:
        """Choose a worker, send, and wait for the first response; on a retryable
        failure before it, the same on another worker (at most `retries` more, and
        only while the retry budget lasts). `new`: a call of its own, which the retry
        budget counts (a stream resumed elsewhere is not)."""
        last: MeshError | None = None
        if new:
            self.budget.on_call()
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
            st = self.stats(worker.worker_id)
            st.on_send()
            start = self._clock()
            timeout = self._timeout(time_remaining(), facts, worker)
            handle = self._transport.call(method, worker, payload, timeout=timeout, metadata=md)
            try:
                first = await handle.read()
            except MeshError as err:
                self._failed(worker, err)
                self._done(st, facts.model)
                handle.cancel()
                hook.ended(err)
                last = err
                if err.retryable and attempt < self._retries and self._retry_allowed(facts, err):
                    log.info("retrying %s elsewhere: %s", facts.request_id, err.code.value)
                    self._obs.retried(facts, worker.worker_id, err)
                    continue
                raise
            except asyncio.CancelledError:
                self._done(st, facts.model)
                handle.cancel()
                if _client_left():
                    hook.ended(None)
                    raise
                # Not our task: grpc cancelled the call locally (its channel closed).
                cut = _cut(worker)
                self._failed(worker, cut)
                hook.ended(cut)
                last = cut
                if attempt < self._retries and self._retry_allowed(facts, cut):
                    self._obs.retried(facts, worker.worker_id, cut)
                    continue
                raise cut from None
            except BaseException:
                self._done(st, facts.model)
                handle.cancel()
                hook.ended(None)
                raise
            ttft = self._clock() - start
            if self._observed:
                hook.first_response(ttft)
            return Attempt(worker, st, handle, first, start, ttft, hook)
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
        resume: Resumable | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Relay a Generate stream. Before its first message a failed attempt is
        retried; after it, with `resume`, the stream moves to another worker, which
        continues after the tokens already delivered (at most `max_migrations` times)."""
        tried: set[str] = set()
        kept: list[bytes] = []  # the relayed messages, while a migration may need them
        moves = 0
        att = await self._start(Method.GENERATE, facts, payload, time_remaining, metadata, tried)
        while True:
            worker, handle = att.worker, att.handle
            reported = False
            self._watch.stream_started(worker.worker_id, worker.address)
            try:
                on_commit(worker.worker_id)
                if att.first is not None:
                    read, end = handle.raw_read, handle.end
                    if resume is None:
                        yield att.first
                        while (msg := await read()) is not end:
                            yield msg  # type: ignore[misc]  # bytes until `end`
                    else:
                        keep = kept.append
                        keep(att.first)
                        yield att.first
                        while (msg := await read()) is not end:
                            keep(msg)  # type: ignore[arg-type]  # bytes until `end`
                            yield msg  # type: ignore[misc]
                            if len(kept) >= FOLD_AFTER:
                                kept[:] = [resume.fold(kept)]
                reported = self._settle(att, facts, await handle.trailers())
                return
            except MeshError as err:
                self._failed(worker, err)
                att.hook.ended(err)
                broke, cause = err, None
            except Exception as exc:  # the transport's own failure, from raw_read
                mapped = handle.translate(exc)
                if mapped is None:
                    raise
                self._failed(worker, mapped)
                att.hook.ended(mapped)
                broke, cause = mapped, exc
            except asyncio.CancelledError:
                if _client_left():
                    att.hook.ended(None)
                    raise
                broke, cause = _cut(worker), None  # grpc cancelled it: its channel closed
                self._failed(worker, broke)
                att.hook.ended(broke)
            except BaseException:
                att.hook.ended(None)
                raise
            finally:
                self._watch.stream_ended(worker.worker_id)
                self._done(att.stats, facts.model, reported)
                handle.cancel()  # no-op when finished; stops the worker when we are cancelled
            # The stream broke after its first message.
            if resume is None or not broke.retryable:
                raise broke from cause
            token_ids, finished = resume.delivered(kept)
            if finished:  # the last message got through; only the trailers were lost
                return
            if moves >= self._max_migrations:
                self._obs.migrated(facts, worker.worker_id, broke, "limit")
                raise broke from cause
            moves += 1
            tried.add(worker.worker_id)
            log.warning(
                "stream %s broke on worker %s after %d tokens (%s); resuming elsewhere",
                facts.request_id, worker.worker_id, len(token_ids), broke.code.value,
            )  # fmt: skip
            again = resume.payload(token_ids, moves)
            try:
                att = await self._start(
                    Method.GENERATE, facts, again, time_remaining, metadata, tried, new=False
                )
            except MeshError as err:
                self._obs.migrated(facts, worker.worker_id, err, "failed")
                raise _unresumed(broke, err, len(token_ids)) from err
            self._obs.migrated(facts, worker.worker_id, broke, "resumed")

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
            self._done(att.stats, facts.model, reported)
        return att.first or b"", att.worker.worker_id


def _client_left() -> bool:
    """Whether the running task itself is being cancelled (the client went away), as
    opposed to a grpc call cancelled under it when its channel closed."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _unresumed(broke: MeshError, err: MeshError, tokens: int) -> MeshError:
    """The error a client sees when its stream broke and could not move: `err`'s
    status (why no worker could take it) with a message naming both failures."""
    out = copy.copy(err)
    out.message = (
        f"{broke.message} after {tokens} tokens, and no other worker could continue "
        f"the stream: {err.message}"
    )
    out.args = (out.message,)
    return out


def _cut(worker: WorkerRecord) -> MeshError:
    return Unavailable(
        f"the connection to worker {worker.worker_id} closed during the call",
        reason=Reason.WORKER_UNAVAILABLE,
        metadata={"worker_id": worker.worker_id},
    )
