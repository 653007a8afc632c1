"""Admission control: a bounded priority queue for calls that find every worker full.

A call waits only while its deadline allows (and at most `max_wait_s`), in
priority order (high, normal, low; FIFO within a priority), then gets
RESOURCE_EXHAUSTED with a message saying why. Never queued past a deadline.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.errors import Reason, ResourceExhausted

# Proto Priority values: 0 unspecified (= normal), 1 high, 2 normal, 3 low.
_RANK = {0: 1, 1: 0, 2: 1, 3: 2}
PRIORITY_NAMES = ("high", "normal", "low")  # by rank


@dataclass(order=True)
class _Entry:
    rank: int
    seq: int
    event: asyncio.Event = field(compare=False, default_factory=asyncio.Event)
    gone: bool = field(compare=False, default=False)


class AdmissionQueue:
    def __init__(self, *, max_waiting: int = 1024, max_wait_s: float = 30.0) -> None:
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self._queues: dict[str, list[_Entry]] = {}
        self._seq = itertools.count()
        self._waiting = 0
        self._by_rank = [0, 0, 0]  # waiting calls per priority (PRIORITY_NAMES)

    @property
    def waiting(self) -> int:
        return self._waiting

    def waiting_by_priority(self) -> dict[str, int]:
        return dict(zip(PRIORITY_NAMES, self._by_rank, strict=True))

    def notify(self, model: str | None = None) -> None:
        """Room may have appeared: wake the head waiter (of `model`, or of every model)."""
        queues = self._queues.values() if model is None else [self._queues.get(model, [])]
        for q in queues:
            while q and q[0].gone:
                heapq.heappop(q)
            if q:
                q[0].event.set()

    async def wait_turn(
        self,
        model: str,
        priority: int,
        time_remaining: float | None,
        has_room: Callable[[], bool],
    ) -> float:
        """Return once `has_room()` holds for this call; the seconds it waited."""
        if self._waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"every worker serving {model!r} is at capacity and {self._waiting} calls "
                "are already queued at this gateway; retry with backoff",
                reason=Reason.QUEUE_FULL,
                metadata={"model": model},
            )
        budget = (
            self.max_wait_s
            if time_remaining is None
            else min(self.max_wait_s, time_remaining * 0.95)
        )
        entry = _Entry(_RANK.get(priority, 1), next(self._seq))
        q = self._queues.setdefault(model, [])
        heapq.heappush(q, entry)
        self._waiting += 1
        self._by_rank[entry.rank] += 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            if q[0] is entry and has_room():
                return 0.0
            while True:
                left = budget - (loop.time() - start)
                if left <= 0:
                    raise ResourceExhausted(
                        f"every worker serving {model!r} stayed at capacity for "
                        f"{budget:.2f}s (the call's deadline allowed no longer); "
                        "retry with backoff or add workers",
                        reason=Reason.QUEUE_TIMEOUT,
                        metadata={"model": model},
                    )
                try:
                    async with asyncio.timeout(left):
                        await entry.event.wait()
                except TimeoutError:
                    continue
                entry.event.clear()
                if has_room():
                    return loop.time() - start
        finally:
            entry.gone = True
            self._waiting -= 1
            self._by_rank[entry.rank] -= 1
            while q and q[0].gone:
                heapq.heappop(q)
            if not q:
                self._queues.pop(model, None)
            elif has_room():
                q[0].event.set()  # pass the turn on: more than one slot may be free
