"""The router's telemetry hook: what metrics, traces and benchmarks learn from the
dispatch loop. No-op by default; `gateway.metrics` (Prometheus) and `meshserve.tracing`
(OpenTelemetry spans) implement it, `Observers` fans out to several."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.scheduler.types import RequestFacts
from gateway.transport import Metadata
from meshserve.errors import MeshError
from meshserve.load import CallCost


class AttemptHook(Protocol):
    """One attempt on one worker, from send to end."""

    def first_response(self, ttft_s: float) -> None: ...

    def ended(self, error: MeshError | None) -> None: ...


class RouterObserver(Protocol):
    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        """The policy chose `worker_id` in `decision_s` (any queueing not included)."""

    def attempt(
        self, facts: RequestFacts, worker_id: str, metadata: Metadata
    ) -> tuple[AttemptHook, Metadata]:
        """An attempt is about to be sent; returns its hook and the metadata to send
        (a tracer adds its trace context)."""
        ...

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        """An attempt on `worker_id` failed before its first response; trying another."""

    def retry_refused(self, facts: RequestFacts, error: MeshError) -> None:
        """A retryable failure the retry budget did not allow to retry."""

    def ejected(self, worker_id: str, error: MeshError) -> None:
        """`worker_id` is routed around for a while (outlier ejection)."""

    def migrated(self, facts: RequestFacts, worker_id: str, error: MeshError, outcome: str) -> None:
        """A stream broke on `worker_id` after its first message (`error`): `outcome`
        "resumed" on another worker, "failed" to (`error` is then why), or "limit":
        it had moved `max_migrations` times already."""

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        """The call waited for room (`error`: it was rejected instead)."""

    def finished(
        self,
        facts: RequestFacts,
        worker_id: str,
        cost: CallCost | None,
        ttft_s: float,
        total_s: float,
    ) -> None:
        """A call ended well on `worker_id`: the worker's own account of it (`cost`),
        and its time to the first response and in all, as this gateway saw them."""


class NoAttempt:
    def first_response(self, ttft_s: float) -> None:
        pass

    def ended(self, error: MeshError | None) -> None:
        pass


NO_ATTEMPT = NoAttempt()


class NoRouterObserver:
    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        pass

    def attempt(
        self, facts: RequestFacts, worker_id: str, metadata: Metadata
    ) -> tuple[AttemptHook, Metadata]:
        return NO_ATTEMPT, metadata

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        pass

    def retry_refused(self, facts: RequestFacts, error: MeshError) -> None:
        pass

    def ejected(self, worker_id: str, error: MeshError) -> None:
        pass

    def migrated(self, facts: RequestFacts, worker_id: str, error: MeshError, outcome: str) -> None:
        pass

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        pass

    def finished(
        self,
        facts: RequestFacts,
        worker_id: str,
        cost: CallCost | None,
        ttft_s: float,
        total_s: float,
    ) -> None:
        pass


NO_ROUTER_OBSERVER = NoRouterObserver()


class _Attempts:
    __slots__ = ("_hooks",)

    def __init__(self, hooks: list[AttemptHook]) -> None:
        self._hooks = hooks

    def first_response(self, ttft_s: float) -> None:
        for h in self._hooks:
            h.first_response(ttft_s)

    def ended(self, error: MeshError | None) -> None:
        for h in self._hooks:
            h.ended(error)


class Observers(NoRouterObserver):
    """Several observers as one (metrics and traces both on)."""

    def __init__(self, observers: Sequence[RouterObserver]) -> None:
        self._all = tuple(observers)

    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        for o in self._all:
            o.picked(facts, worker_id, decision_s)

    def attempt(
        self, facts: RequestFacts, worker_id: str, metadata: Metadata
    ) -> tuple[AttemptHook, Metadata]:
        hooks = []
        for o in self._all:
            hook, metadata = o.attempt(facts, worker_id, metadata)
            if hook is not NO_ATTEMPT:
                hooks.append(hook)
        return (_Attempts(hooks) if hooks else NO_ATTEMPT), metadata

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        for o in self._all:
            o.retried(facts, worker_id, error)

    def retry_refused(self, facts: RequestFacts, error: MeshError) -> None:
        for o in self._all:
            o.retry_refused(facts, error)

    def ejected(self, worker_id: str, error: MeshError) -> None:
        for o in self._all:
            o.ejected(worker_id, error)

    def migrated(self, facts: RequestFacts, worker_id: str, error: MeshError, outcome: str) -> None:
        for o in self._all:
            o.migrated(facts, worker_id, error, outcome)

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        for o in self._all:
            o.queued(facts, wait_s, error)

    def finished(
        self,
        facts: RequestFacts,
        worker_id: str,
        cost: CallCost | None,
        ttft_s: float,
        total_s: float,
    ) -> None:
        for o in self._all:
            o.finished(facts, worker_id, cost, ttft_s, total_s)


def combine(observers: Sequence[RouterObserver]) -> RouterObserver:
    if not observers:
        return NO_ROUTER_OBSERVER
    return observers[0] if len(observers) == 1 else Observers(observers)
