"""The worker's telemetry hooks: what the host learns of each request and an engine of
each step. No-op by default; `worker.metrics` implements them for Prometheus and
`meshserve.tracing` turns a request's phases into spans."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Generation:
    """One Generate request as the host saw it (seconds from its admission)."""

    model: str
    request_id: str
    tokens: int  # generated and handed out (also when the stream ended early)
    queue_s: float  # waiting for an engine slot (0 for engines without a queue)
    first_token_s: float | None  # admission to the first chunk (None: none came)
    total_s: float  # admission to the end of the stream
    finished: bool  # reached its finish (not cancelled, not failed)


class HostObserver(Protocol):
    def generated(self, g: Generation) -> None: ...


class EngineObserver(Protocol):
    """Called from an engine's own thread: implementations must be thread-safe."""

    def prefill(self, model: str, requests: int, tokens: int, seconds: float) -> None: ...

    def step(self, model: str, batch_size: int, seconds: float) -> None: ...


class NoHostObserver:
    def generated(self, g: Generation) -> None:
        pass


class NoEngineObserver:
    def prefill(self, model: str, requests: int, tokens: int, seconds: float) -> None:
        pass

    def step(self, model: str, batch_size: int, seconds: float) -> None:
        pass


NO_HOST_OBSERVER = NoHostObserver()
NO_ENGINE_OBSERVER = NoEngineObserver()


class HostObservers(NoHostObserver):
    def __init__(self, observers: Sequence[HostObserver]) -> None:
        self._all = tuple(observers)

    def generated(self, g: Generation) -> None:
        for o in self._all:
            o.generated(g)
