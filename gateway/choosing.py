"""Choosing a worker: the fleet's ready workers for a model, the policy's ranking,
ejected workers as a last resort, and waiting for room (admission) when all are full.
The router (gateway.router) is this plus sending, retrying and accounting."""

from __future__ import annotations

import random
from collections.abc import Callable

from gateway.admission import AdmissionQueue
from gateway.observe import RouterObserver
from gateway.outliers import Outliers
from gateway.routing import FleetView, Policies, no_worker_error
from gateway.scheduler.types import RequestFacts
from gateway.stats import Candidates, WorkerStats, fitting, longest_fit
from meshserve.errors import MeshError
from registry.records import WorkerRecord

TimeRemaining = Callable[[], float | None]


class Chooser:
    def __init__(
        self,
        *,
        fleet: FleetView,
        policies: Policies,
        admission: AdmissionQueue,
        observer: RouterObserver,
        outliers: Outliers,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self._view = fleet
        self.policies = policies
        self.admission = admission
        self._obs = observer
        self.outliers = outliers
        self._rng = rng
        self._clock = clock
        self._stats: dict[str, WorkerStats] = {}
        self._ready: dict[str, list[WorkerRecord]] = {}
        self._ready_ids: dict[str, tuple[str, ...]] = {}
        self._longest_fit: dict[str, int] = {}  # per model: what every ready worker takes

    def stats(self, worker_id: str) -> WorkerStats:
        st = self._stats.get(worker_id)
        if st is None:
            st = self._stats[worker_id] = WorkerStats()
        return st

    def ejected(self, worker_id: str) -> bool:
        """Whether the worker is ejected now (UNAVAILABLE or timeouts; a last resort)."""
        return self.outliers.ejected(worker_id)

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
        pool = self.outliers.healthy(ready) if self.outliers else ready
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
