"""The router's telemetry hook: what metrics, traces and benchmarks learn from the
dispatch loop. No-op by default; `gateway.metrics` implements it for Prometheus."""

from __future__ import annotations

from typing import Protocol

from gateway.scheduler.types import RequestFacts
from meshserve.errors import MeshError
from meshserve.load import CallCost


class RouterObserver(Protocol):
    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        """A worker was chosen for an attempt; `decision_s` includes any queueing."""

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        """An attempt on `worker_id` failed before its first response; trying another."""

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        """The call waited for room (`error`: it was rejected instead)."""

    def finished(self, facts: RequestFacts, worker_id: str, cost: CallCost | None) -> None:
        """A call ended well on `worker_id`; `cost` is the worker's own account of it."""


class NoRouterObserver:
    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        pass

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        pass

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        pass

    def finished(self, facts: RequestFacts, worker_id: str, cost: CallCost | None) -> None:
        pass


NO_ROUTER_OBSERVER = NoRouterObserver()
