"""Relay of a response stream that coalesces messages which queued up.

A lone message goes out at once, unchanged (never delayed, never re-encoded).
When the client side is slower than the worker (a busy gateway, a slow client),
messages that are already waiting are merged into one: text concatenated, token
ids appended, the finish reason and usage of the last kept. Order is preserved
and nothing is dropped; fewer, larger writes are what keep the gateway's CPU per
token low under load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from meshserve.v1 import inference_pb2

_END = object()
MAX_MERGE = 64  # keep one merged message bounded


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


async def coalesce(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except BaseException as exc:  # handed to the consumer, in order
            queue.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        queue.put_nowait(_END)

    task = asyncio.create_task(pump(), name="relay-pump")
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, bytes)
            if queue.empty():
                yield item
                continue
            batch = [item]
            tail: object = None
            while not queue.empty() and len(batch) < MAX_MERGE:
                nxt = queue.get_nowait()
                if not isinstance(nxt, bytes):
                    tail = nxt
                    break
                batch.append(nxt)
            yield merge_generate(batch)
            if tail is _END:
                return
            if isinstance(tail, BaseException):
                raise tail
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Close the source in this task so its own cleanup (cancelling the
        # worker call) runs even when the pump was cancelled mid-read.
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
