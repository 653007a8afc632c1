"""Relay of a Generate response stream that coalesces messages which queued up (the
worker's messages and the gateway's relayed bytes alike).

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

from collections.abc import AsyncIterator

from meshserve import coalesce as _coalesce
from meshserve.v1 import inference_pb2

# Default minimum time between two writes on one stream (0: write whenever possible).
INTERVAL_S = 0.0


def merge_responses(msgs: list[inference_pb2.GenerateResponse]) -> inference_pb2.GenerateResponse:
    """The one merge of consecutive Generate messages: text and token ids joined, the
    last finish reason and usage kept (the worker merges its messages with it, the
    gateway relayed ones). Merges into the first message, which it returns."""
    merged = msgs[0]
    texts = [merged.text]
    for msg in msgs[1:]:
        texts.append(msg.text)
        merged.token_ids.extend(msg.token_ids)
        if msg.finish_reason:
            merged.finish_reason = msg.finish_reason
        if msg.HasField("usage"):
            merged.usage.CopyFrom(msg.usage)
        if msg.resumed:
            merged.resumed = msg.resumed
    merged.text = "".join(texts)
    return merged


def merge_generate(chunks: list[bytes]) -> bytes:
    """`merge_responses` over serialized messages (the gateway relays bytes)."""
    msgs = [inference_pb2.GenerateResponse.FromString(raw) for raw in chunks]
    return merge_responses(msgs).SerializeToString()


def coalesce(
    source: AsyncIterator[bytes], *, interval_s: float | None = None
) -> AsyncIterator[bytes]:
    """Relay serialized GenerateResponse messages, merging those that queued up."""
    interval = INTERVAL_S if interval_s is None else interval_s
    return _coalesce.coalesce(source, merge_generate, interval_s=interval)


def coalesce_messages(
    source: AsyncIterator[inference_pb2.GenerateResponse],
) -> AsyncIterator[inference_pb2.GenerateResponse]:
    """The same for GenerateResponse messages (the worker, before serialization)."""
    return _coalesce.coalesce(source, merge_responses)
