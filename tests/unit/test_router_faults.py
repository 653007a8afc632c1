"""How the router ends a call when a worker fails: deadlines, local cancellation (a
channel closed under a call), consecutive timeouts, and the retry budget."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from gateway.observe import NoRouterObserver
from gateway.retry_budget import RetryBudget
from gateway.router import Router
from gateway.routing import Policies
from gateway.scheduler import RequestFacts, build_policy
from meshserve.errors import DeadlineExceeded, ErrorCode, MeshError, Reason
from tests.unit.test_router import (
    Clock,
    FakeHandle,
    FakeTransport,
    FakeView,
    Script,
    _collect,
    _err,
    _facts,
    _noop,
    _worker,
)

# In a script: grpc cancels the call locally (its channel closed) instead of answering.
CUT = MeshError("cut")


@dataclass
class CuttableHandle(FakeHandle):
    async def read(self) -> bytes | None:
        if self.script and self.script[0] is CUT:
            self.script.pop(0)
            raise asyncio.CancelledError  # what grpc.aio raises for a locally cancelled call
        return await super().read()


def Transport(scripts: dict[str, list[Script]]) -> FakeTransport:
    """The shared fake transport, its handles able to be cut locally."""
    return FakeTransport(scripts, handle=CuttableHandle)


def _router(ids: list[str], fwd: FakeTransport, clock: Clock, **kw: object) -> Router:
    return Router(
        fleet=FakeView({i: _worker(i) for i in ids}),
        transport=fwd,
        policies=Policies(build_policy("least_inflight"), build_policy),
        rng=random.Random(0),
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )


async def test_a_call_past_its_deadline_is_not_sent() -> None:
    fwd = Transport({"a": [[b"x"]]})
    router = _router(["a"], fwd, Clock())
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        await router.infer(_facts(), b"", time_remaining=lambda: 0.0, metadata=())
    assert fwd.calls == []


async def test_a_call_without_deadline_gets_the_gateway_limit() -> None:
    fwd = Transport({"a": [[b"x"], [b"y"]]})
    router = _router(["a"], fwd, Clock(), max_call_s=42.0)
    await router.infer(_facts(), b"", time_remaining=lambda: None, metadata=())
    await router.infer(_facts(), b"", time_remaining=lambda: 3.0, metadata=())
    assert fwd.timeouts == [42.0, 3.0]


async def test_a_call_cut_locally_before_its_answer_is_retried_elsewhere() -> None:
    fwd = Transport({"a": [[CUT]], "b": [[CUT]]})
    router = _router(["a", "b"], fwd, Clock())
    first = router.rank(_facts(), set())[0].worker_id
    fwd.scripts["b" if first == "a" else "a"] = [[b"ok"]]
    resp, wid = await router.infer(_facts(), b"", time_remaining=lambda: None, metadata=())
    assert resp == b"ok" and wid != first
    assert router.ejected(first)


async def test_a_stream_cut_locally_ends_with_unavailable_not_cancelled() -> None:
    fwd = Transport({"a": [[b"1", CUT]]})
    router = _router(["a"], fwd, Clock())
    got: list[bytes] = []
    with pytest.raises(MeshError) as info:
        async for c in router.generate(
            _facts(), b"", time_remaining=lambda: None, metadata=(), on_commit=_noop
        ):
            got.append(c)
    assert got == [b"1"]
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert info.value.reason == Reason.WORKER_UNAVAILABLE
    assert "closed during the call" in info.value.message


async def test_client_cancellation_still_cancels() -> None:
    started = asyncio.Event()

    @dataclass
    class Never(FakeHandle):
        async def read(self) -> bytes | None:
            started.set()
            await asyncio.Event().wait()  # a worker that never answers
            return None

    fwd = FakeTransport({"a": [[b"x"]]}, handle=Never)
    router = _router(["a"], fwd, Clock())
    task = asyncio.create_task(
        router.infer(_facts(), b"", time_remaining=lambda: None, metadata=())
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not router.ejected("a")  # the client left: nothing held against the worker


async def test_consecutive_timeouts_eject_a_worker_and_a_success_resets_the_count() -> None:
    clock = Clock()
    timeout = _err(ErrorCode.DEADLINE_EXCEEDED, "deadline")
    fwd = Transport({"a": [[timeout], [timeout], [b"ok"], [timeout], [timeout], [timeout]]})
    router = _router(["a"], fwd, clock, retries=0, max_timeouts=3)

    async def call() -> None:
        await router.infer(_facts(), b"", time_remaining=lambda: 1.0, metadata=())

    for _ in range(2):
        with pytest.raises(MeshError):
            await call()
    await call()  # the success clears the two
    for _ in range(2):
        with pytest.raises(MeshError):
            await call()
    assert not router.ejected("a")
    with pytest.raises(MeshError):
        await call()
    assert router.ejected("a")
    clock.now += 6.0  # re-admitted when the ejection is over
    assert not router.ejected("a")


class Seen(NoRouterObserver):
    def __init__(self) -> None:
        self.refused: list[str] = []
        self.ejected_ids: list[str] = []

    def retry_refused(self, facts: RequestFacts, error: MeshError) -> None:
        self.refused.append(str(error.reason))

    def ejected(self, worker_id: str, error: MeshError) -> None:
        self.ejected_ids.append(worker_id)


async def test_retries_stop_when_the_budget_is_spent() -> None:
    clock = Clock()
    fwd = Transport({w: [[_err(ErrorCode.UNAVAILABLE)] for _ in range(10)] for w in ("a", "b")})
    budget = RetryBudget(ratio=0.0, min_per_s=0.2, window_s=10, clock=clock)  # 2 retries
    seen = Seen()
    router = _router(["a", "b"], fwd, clock, budget=budget, eject_s=0.001, observer=seen)
    for _ in range(5):
        with pytest.raises(MeshError):
            await _collect(router)
    assert len(fwd.calls) == 5 + 2  # 5 first attempts, 2 retries
    assert budget.exhausted == 3 and len(seen.refused) == 3
    assert set(seen.ejected_ids) == {"a", "b"}  # observed when each was first ejected


def test_budget_allows_a_share_of_calls_plus_a_floor_over_a_sliding_window() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.1, window_s=10, clock=clock)  # floor 1
    for _ in range(20):
        budget.on_call()
    allowed = sum(budget.try_retry() for _ in range(10))
    assert allowed == 5  # 20% of 20, plus the floor of 1
    assert budget.snapshot() == (20, 5)
    clock.now += 5.0
    assert not budget.try_retry()  # still inside the window
    clock.now += 5.5  # the first second's calls and retries left the window
    assert budget.snapshot() == (0, 0)
    assert budget.try_retry()  # the floor
    assert not budget.try_retry()


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=1.5)


async def test_a_call_ending_after_its_worker_came_back_does_not_skew_the_new_stats() -> None:
    fwd = Transport({"a": [[b"1", b"2"]]})
    view = FakeView({"a": _worker("a")})
    router = Router(
        fleet=view,
        transport=fwd,
        policies=Policies(build_policy("least_inflight"), build_policy),
        clock=Clock(),
    )
    gen = router.generate(_facts(), b"", time_remaining=lambda: None, metadata=(), on_commit=_noop)
    assert await anext(gen) == b"1"
    assert router.inflight("a") == 1
    view.fleet.pop("a")  # restarted under the same id while the call drains
    router.on_view_change()
    view.fleet["a"] = _worker("a")
    router.on_view_change()
    assert [m async for m in gen] == [b"2"]
    assert router.inflight("a") == 0  # was -1: the old call left the new worker's count
