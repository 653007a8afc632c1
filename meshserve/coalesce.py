"""Coalescing of a stream's items that queue up behind a slower writer.

An item goes out as soon as the previous write on its stream has completed (and, with
`interval_s` > 0, once that much time has passed since the previous write began),
unchanged when it is alone. Items that arrived meanwhile are merged into one by the
caller's `merge` (order preserved, nothing dropped). The first item and the end of a
stream are never held. Used by the worker (engine chunks, where the queue forms when
writes lag) and the gateway (relayed messages).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_MERGE = 64  # keep one merged item bounded


class _Inbox(Generic[T]):
    """What the pump has read and not yet been relayed, with a single waiter.

    Cheaper than an asyncio.Queue: one deque, and a future only while the consumer
    actually waits (most appends find nobody waiting)."""

    __slots__ = ("done", "error", "items", "waiter")

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self.done = False  # the source is exhausted (or failed: see error)
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


async def coalesce(
    source: AsyncIterator[T], merge: Callable[[list[T]], T], *, interval_s: float = 0.0
) -> AsyncIterator[T]:
    interval = interval_s
    inbox: _Inbox[T] = _Inbox()
    loop = asyncio.get_running_loop()

    async def pump() -> None:
        try:
            async for item in source:
                inbox.items.append(item)
                inbox.wake()
        except BaseException as exc:  # handed to the consumer, after what came before
            inbox.error = exc
            if isinstance(exc, asyncio.CancelledError):
                inbox.done = True
                inbox.wake()
                raise
        inbox.done = True
        inbox.wake()

    task: asyncio.Task[None] | None = None
    items = inbox.items
    try:
        # The first message is read here rather than handed over by the pump: one task
        # switch less on the time to first token.
        try:
            first = await anext(source)
        except StopAsyncIteration:
            return
        task = asyncio.create_task(pump(), name="relay-pump")
        last_write = loop.time()
        yield first
        while True:
            if not items:
                if inbox.done:
                    if inbox.error is not None:
                        raise inbox.error
                    return
                await inbox.wait()
                continue
            if interval > 0 and not inbox.done:
                # Hold a hot stream until the interval is up; what arrives meanwhile
                # joins this write.
                due = last_write + interval - loop.time()
                if due > 0:
                    await asyncio.sleep(due)
            last_write = loop.time()
            if len(items) == 1:
                yield items.popleft()
                continue
            n = min(len(items), MAX_MERGE)
            yield merge([items.popleft() for _ in range(n)])
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Close the source in this task so its own cleanup (cancelling a worker
        # call, stopping an engine) runs even when the pump was cancelled mid-read.
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
