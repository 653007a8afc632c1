"""Relay of a response stream that coalesces messages which queued up.

A message goes out as soon as the previous write on its stream has completed (and, with
`interval_s` > 0, once that much time has passed since the previous write began),
unchanged (never re-encoded) when it is alone. Messages that arrived meanwhile are
merged into one: text concatenated, token ids appended, the finish reason and usage of
the last kept. Order is preserved and nothing is dropped. The first message and the end
of a stream are never held.

Why: each message costs the gateway a read from the worker and a write to the client
(tens of microseconds of CPU each in grpc.aio) and the client a read; a merged message
costs one write for several tokens. With `interval_s` = 0 (the default) nothing is ever
delayed, but merging then happens only when writes lag behind reads (a slow client):
a stream's next read and its next write each complete in one turn of the same event
loop, so a merely busy gateway keeps pace message for message and builds no queue. A
positive interval caps the writes per stream (one per interval) and so bounds the CPU
per token on streams faster than that, at the cost of up to `interval_s` of delay for
them; streams slower than the interval are relayed message for message, undelayed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from meshserve.v1 import inference_pb2

MAX_MERGE = 64  # keep one merged message bounded
# Default minimum time between two writes on one stream (0: write whenever possible).
INTERVAL_S = 0.0


def merge_generate(chunks: list[bytes]) -> bytes:
    merged = inference_pb2.GenerateResponse.FromString(chunks[0])
    texts = [merged.text]
    for raw in chunks[1:]:
        msg = inference_pb2.GenerateResponse.FromString(raw)
        texts.append(msg.text)
        merged.token_ids.extend(msg.token_ids)
        if msg.finish_reason:
            merged.finish_reason = msg.finish_reason
        if msg.HasField("usage"):
            merged.usage.CopyFrom(msg.usage)
    merged.text = "".join(texts)
    return merged.SerializeToString()


class _Inbox:
    """What the pump has read and not yet been relayed, with a single waiter.

    Cheaper than an asyncio.Queue: one deque, and a future only while the consumer
    actually waits (most appends find nobody waiting)."""

    __slots__ = ("done", "error", "items", "waiter")

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
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
    source: AsyncIterator[bytes], *, interval_s: float | None = None
) -> AsyncIterator[bytes]:
    interval = INTERVAL_S if interval_s is None else interval_s
    inbox = _Inbox()
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
            yield merge_generate([items.popleft() for _ in range(n)])
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Close the source in this task so its own cleanup (cancelling the
        # worker call) runs even when the pump was cancelled mid-read.
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
