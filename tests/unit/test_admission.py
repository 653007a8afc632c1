"""Admission queue: priority order, deadlines, bounds, hand-off of freed room."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import AdmissionQueue
from meshserve.errors import ResourceExhausted
from tests.aio import settle


async def test_waits_until_room_then_admits_in_priority_order() -> None:
    q = AdmissionQueue()
    room = {"free": 0}
    order: list[str] = []

    def has_room() -> bool:
        return room["free"] > 0

    async def call(name: str, prio: int) -> None:
        await q.wait_turn("m", prio, None, has_room)
        room["free"] -= 1
        order.append(name)

    low = asyncio.create_task(call("low", 3))
    normal = asyncio.create_task(call("normal", 0))
    high = asyncio.create_task(call("high", 1))
    await settle(lambda: q.waiting >= 3)
    for _ in range(3):
        room["free"] += 1
        q.notify("m")
        await settle(lambda: len(order) >= 3 - q.waiting)
    await asyncio.gather(low, normal, high)
    assert order == ["high", "normal", "low"]
    assert q.waiting == 0


async def test_deadline_bounds_the_wait() -> None:
    q = AdmissionQueue(max_wait_s=30)
    with pytest.raises(ResourceExhausted, match="stayed at capacity"):
        await q.wait_turn("m", 0, 0.05, lambda: False)
    assert q.waiting == 0


async def test_full_queue_rejects_at_once() -> None:
    q = AdmissionQueue(max_waiting=1)
    waiter = asyncio.create_task(q.wait_turn("m", 0, None, lambda: False))
    await settle(lambda: q.waiting >= 1)
    with pytest.raises(ResourceExhausted, match="already queued"):
        await q.wait_turn("m", 0, None, lambda: True)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.waiting == 0


async def test_freed_room_is_passed_on_to_the_next_waiter() -> None:
    q = AdmissionQueue()
    free = {"n": 0}
    admitted: list[int] = []

    async def call(i: int) -> None:
        await q.wait_turn("m", 0, None, lambda: free["n"] > 0)
        free["n"] -= 1
        admitted.append(i)

    tasks = [asyncio.create_task(call(i)) for i in range(3)]
    await settle(lambda: q.waiting >= 3)
    free["n"] = 3  # three slots at once: one notify must admit all three
    q.notify("m")
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert admitted == [0, 1, 2]
