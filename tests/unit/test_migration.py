"""Stream migration in the router: a stream that breaks after its first message goes
on on another worker, sent the tokens it already delivered as its continuation."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gateway.observe import NoRouterObserver
from gateway.resume import Resume
from gateway.router import Router
from gateway.scheduler import RequestFacts
from gateway.transport import FOLD_AFTER, Metadata, Method
from meshserve.errors import ErrorCode, MeshError
from meshserve.v1 import inference_pb2 as pb
from registry.records import WorkerRecord
from tests.unit.test_router import Clock, FakeHandle, FakeTransport, Script, _err, _facts, _noop
from tests.unit.test_router_faults import CUT, CuttableHandle, _router

REQUEST = pb.GenerateRequest(
    model="m", prompt="hi", request_id="r", sampling=pb.SamplingParams(max_tokens=50, seed=7)
)


def msg(*ids: int, finish: bool = False) -> bytes:
    out = pb.GenerateResponse(request_id="r", text="".join(f" t{i}" for i in ids), token_ids=ids)
    if finish:
        out.finish_reason = pb.FINISH_REASON_LENGTH
    return out.SerializeToString()


@dataclass
class Moves(NoRouterObserver):
    seen: list[tuple[str, str]] = field(default_factory=list)

    def migrated(self, facts: RequestFacts, worker_id: str, error: MeshError, outcome: str) -> None:
        self.seen.append((worker_id, outcome))


@dataclass
class Recording(FakeTransport):
    """The fake transport, keeping each call's payload. Scripts go to the calls in
    order, whichever worker the policy picks (scripts["a"] first, then "b"...)."""

    payloads: list[tuple[str, bytes]] = field(default_factory=list)

    def call(
        self,
        method: Method,
        worker: WorkerRecord,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> FakeHandle:
        self.payloads.append((worker.worker_id, payload))
        turn = sorted(self.scripts)[len(self.payloads) - 1]
        handle = self.handle(worker.worker_id, self.scripts[turn].pop(0))
        self.calls.append((worker.worker_id, handle))
        return handle

    def continuation(self, n: int) -> pb.Continuation:
        return pb.GenerateRequest.FromString(self.payloads[n][1]).continuation


def _mesh(scripts: dict[str, list[Script]], **kw: object) -> tuple[Router, Recording, Moves]:
    fwd, moves = Recording(scripts, handle=CuttableHandle), Moves()
    return _router(list(scripts), fwd, Clock(), observer=moves, **kw), fwd, moves


async def _stream(router: Router, resume: Resume | None) -> list[bytes]:
    payload = REQUEST.SerializeToString()
    return [
        m
        async for m in router.generate(
            _facts(),
            payload,
            time_remaining=lambda: None,
            metadata=(),
            on_commit=_noop,
            resume=resume,
        )
    ]


def _ids(messages: list[bytes]) -> list[int]:
    return [i for m in messages for i in pb.GenerateResponse.FromString(m).token_ids]


async def test_a_broken_stream_goes_on_elsewhere_with_what_it_delivered() -> None:
    unavailable = _err(ErrorCode.UNAVAILABLE)
    router, fwd, moves = _mesh(
        {"a": [[msg(1), msg(2), unavailable]], "b": [[msg(3), msg(4, finish=True)]]}
    )
    out = await _stream(router, Resume(REQUEST.SerializeToString()))
    assert _ids(out) == [1, 2, 3, 4]
    assert len({w for w, _ in fwd.payloads}) == 2  # not the same worker again
    cont = fwd.continuation(1)
    assert list(cont.token_ids) == [1, 2] and cont.resumed == 1
    again = pb.GenerateRequest.FromString(fwd.payloads[1][1])
    assert again.prompt == "hi" and again.sampling.seed == 7  # the rest unchanged
    assert moves.seen == [(fwd.payloads[0][0], "resumed")]


async def test_each_move_sends_every_token_delivered_so_far() -> None:
    cut = _err(ErrorCode.UNAVAILABLE)
    router, fwd, _ = _mesh(
        {"a": [[msg(1), cut]], "b": [[msg(2, 3), cut]], "c": [[msg(4, finish=True)]]}
    )
    out = await _stream(router, Resume(REQUEST.SerializeToString()))
    assert _ids(out) == [1, 2, 3, 4]
    assert [list(fwd.continuation(i).token_ids) for i in (1, 2)] == [[1], [1, 2, 3]]
    assert fwd.continuation(2).resumed == 2


async def test_a_channel_closed_under_the_stream_moves_it_too() -> None:
    router, _, _ = _mesh({"a": [[msg(1), CUT]], "b": [[msg(2, finish=True)]]})
    assert _ids(await _stream(router, Resume(REQUEST.SerializeToString()))) == [1, 2]


async def test_a_long_stream_is_folded_and_still_resumed_exactly() -> None:
    n = FOLD_AFTER * 2 + 17
    script: Script = [msg(i) for i in range(n)]
    script.append(_err(ErrorCode.UNAVAILABLE))
    router, fwd, _ = _mesh({"a": [script], "b": [[msg(n, finish=True)]]})
    out = await _stream(router, Resume(REQUEST.SerializeToString()))
    assert _ids(out) == list(range(n + 1))
    assert list(fwd.continuation(1).token_ids) == list(range(n))


async def test_moves_stop_at_the_limit() -> None:
    cut = _err(ErrorCode.UNAVAILABLE)
    router, _, moves = _mesh(
        {"a": [[msg(1), cut]], "b": [[msg(2), cut]], "c": [[msg(3, finish=True)]]},
        max_migrations=1,
    )
    with pytest.raises(MeshError) as info:
        await _stream(router, Resume(REQUEST.SerializeToString()))
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert [o for _, o in moves.seen] == ["resumed", "limit"]


async def test_without_a_resume_the_stream_ends_with_the_error() -> None:
    router, fwd, moves = _mesh(
        {"a": [[msg(1), _err(ErrorCode.UNAVAILABLE)]], "b": [[msg(2, finish=True)]]}
    )
    with pytest.raises(MeshError):
        await _stream(router, None)
    assert len(fwd.payloads) == 1 and moves.seen == []


async def test_an_error_that_is_not_retryable_is_not_moved() -> None:
    router, fwd, _ = _mesh({"a": [[msg(1), _err(ErrorCode.INTERNAL)]], "b": [[msg(2)]]})
    with pytest.raises(MeshError) as info:
        await _stream(router, Resume(REQUEST.SerializeToString()))
    assert info.value.code is ErrorCode.INTERNAL and len(fwd.payloads) == 1


async def test_a_stream_whose_last_message_got_through_just_ends() -> None:
    router, fwd, moves = _mesh(
        {"a": [[msg(1), msg(2, finish=True), _err(ErrorCode.UNAVAILABLE)]], "b": [[msg(9)]]}
    )
    assert _ids(await _stream(router, Resume(REQUEST.SerializeToString()))) == [1, 2]
    assert len(fwd.payloads) == 1 and moves.seen == []


async def test_no_worker_left_ends_the_stream_with_a_status() -> None:
    router, _, moves = _mesh({"a": [[msg(1), _err(ErrorCode.UNAVAILABLE)]]})
    with pytest.raises(MeshError) as info:
        await _stream(router, Resume(REQUEST.SerializeToString()))
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert [o for _, o in moves.seen] == ["failed"]


async def test_a_move_is_not_charged_to_the_retry_budget() -> None:
    router, _, _ = _mesh(
        {"a": [[msg(1), _err(ErrorCode.UNAVAILABLE)]], "b": [[msg(2, finish=True)]]}
    )
    await _stream(router, Resume(REQUEST.SerializeToString()))
    assert router.budget.snapshot() == (1, 0)
