"""Stream coalescing (worker chunks and gateway relay): order, merging, errors, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from meshserve.coalesce import MAX_MERGE
from meshserve.relay import coalesce as relay
from meshserve.relay import coalesce_messages
from meshserve.v1 import inference_pb2 as pb


def msg(i: int, **kw: object) -> bytes:
    m = pb.GenerateResponse(request_id="r", text=f" t{i}", token_ids=[i], **kw)  # type: ignore[arg-type]
    return m.SerializeToString()


async def burst(n: int, **last: object) -> AsyncIterator[bytes]:
    for i in range(n):
        yield msg(i, **(last if i == n - 1 else {}))


async def test_messages_that_queue_are_merged_in_order() -> None:
    fin = {"finish_reason": pb.FINISH_REASON_LENGTH, "usage": pb.Usage(completion_tokens=5)}
    out = [pb.GenerateResponse.FromString(m) async for m in relay(burst(5, **fin))]
    assert [t for m in out for t in m.token_ids] == list(range(5))
    assert "".join(m.text for m in out) == "".join(f" t{i}" for i in range(5))
    assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert out[-1].usage.completion_tokens == 5
    assert len(out) < 5  # a burst is written in fewer messages


async def test_a_lone_message_is_relayed_unchanged_and_at_once() -> None:
    gate = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield msg(0)
        await gate.wait()
        yield msg(1)

    it = relay(slow())
    assert await anext(it) == msg(0)  # not held back waiting for company
    gate.set()
    assert [m async for m in it] == [msg(1)]


async def test_merges_are_bounded() -> None:
    out = [pb.GenerateResponse.FromString(m) async for m in relay(burst(200))]
    assert all(len(m.token_ids) <= MAX_MERGE for m in out)
    assert [t for m in out for t in m.token_ids] == list(range(200))


async def test_an_error_arrives_after_what_came_before() -> None:
    async def src() -> AsyncIterator[bytes]:
        yield msg(0)
        yield msg(1)
        raise RuntimeError("boom")

    got: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        async for m in relay(src()):
            got.extend(pb.GenerateResponse.FromString(m).token_ids)
    assert got == [0, 1]


async def test_closing_early_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            i = 0
            while True:
                yield msg(i)
                i += 1
                await asyncio.sleep(0)
        finally:
            closed.set()

    it = relay(endless())
    await anext(it)
    await it.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()


async def test_worker_messages_merge_with_the_last_finish() -> None:
    async def messages() -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(text="a", token_ids=[1])
        yield pb.GenerateResponse(text="b", token_ids=[2])
        yield pb.GenerateResponse(
            text="c", token_ids=[3], finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=4, completion_tokens=3),
        )  # fmt: skip

    out = [m async for m in coalesce_messages(messages())]
    assert len(out) < 3  # the burst queued behind the first write and was merged
    assert "".join(m.text for m in out) == "abc"
    assert [t for m in out for t in m.token_ids] == [1, 2, 3]
    assert out[-1].finish_reason == pb.FINISH_REASON_STOP
    assert (out[-1].usage.prompt_tokens, out[-1].usage.completion_tokens) == (4, 3)
