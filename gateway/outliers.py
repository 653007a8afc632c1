"""Outlier ejection: which workers to route around for a while, and why.

A worker is ejected (used only as a last resort) for `eject_s` when it answers
UNAVAILABLE, or after `max_timeouts` calls in a row ended in a timeout or a stall with
no success between: a stopped (SIGSTOP) or wedged worker answers nothing, so only its
timeouts tell. It is re-admitted when the time is up; its next success clears its count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshserve.errors import ErrorCode, MeshError
from registry.records import WorkerRecord


class Outliers:
    def __init__(
        self, *, clock: Callable[[], float], eject_s: float = 5.0, max_timeouts: int = 3
    ) -> None:
        self._clock = clock
        self._eject_s = eject_s
        self._max_timeouts = max_timeouts
        self._until: dict[str, float] = {}
        self._timeouts: dict[str, int] = {}
        self.ejections = 0

    def __bool__(self) -> bool:
        return bool(self._until)

    def failed(self, worker_id: str, err: MeshError) -> bool:
        """Account a failure; True when it ejects a worker that was not ejected."""
        if err.code is ErrorCode.UNAVAILABLE:
            return self._eject(worker_id)
        if err.code is ErrorCode.DEADLINE_EXCEEDED:
            n = self._timeouts[worker_id] = self._timeouts.get(worker_id, 0) + 1
            if n >= self._max_timeouts:
                self._timeouts[worker_id] = 0
                return self._eject(worker_id)
        return False

    def succeeded(self, worker_id: str) -> None:
        if self._timeouts:
            self._timeouts.pop(worker_id, None)

    def _eject(self, worker_id: str) -> bool:
        new = self._until.get(worker_id, 0.0) <= self._clock()
        self.ejections += new
        self._until[worker_id] = self._clock() + self._eject_s
        return new

    def ejected(self, worker_id: str) -> bool:
        return self._until.get(worker_id, 0.0) > self._clock()

    def healthy(self, pool: list[WorkerRecord]) -> list[WorkerRecord]:
        """The pool without ejected workers; the whole pool when all are (a last resort,
        not a dead end)."""
        now = self._clock()
        healthy = [w for w in pool if self._until.get(w.worker_id, 0.0) <= now]
        return healthy or pool

    def expire(self) -> None:
        now = self._clock()
        for wid in [w for w, t in self._until.items() if t <= now]:
            del self._until[wid]

    def forget(self, live: Sequence[str] | set[str]) -> None:
        for d in (self._until, self._timeouts):
            for wid in [w for w in d if w not in live]:
                del d[wid]
