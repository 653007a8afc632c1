"""Router mechanism with a fake forwarder, a fixed fleet and an injected clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.router import Router
from gateway.routing import Policies
from gateway.scheduler import RequestFacts, build_policy
from gateway.transport import Metadata, Method, Trailers
from meshserve.errors import ErrorCode, MeshError, NotFound, Unavailable
from meshserve.vocab import ModelKind, ModelState, WorkerState
from registry.aliases import AliasRecord
from registry.records import ModelEntry, WorkerRecord
from tests.aio import settle


def _worker(wid: str, mstate: ModelState = ModelState.READY, **kw: object) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid,
        address=f"{wid}:1",
        models=(ModelEntry("m", ModelKind.GENERATE, mstate),),
        capacity=4,
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class FakeView:
    fleet: dict[str, WorkerRecord]
    aliases: dict[str, AliasRecord] = field(default_factory=dict)

    @property
    def workers(self) -> Mapping[str, WorkerRecord]:
        return self.fleet

    def ready_for(self, model: str) -> list[WorkerRecord]:
        return [w for w in self.fleet.values() if w.serves(model)]

    def models(self) -> set[str]:
        return {m.name for w in self.fleet.values() for m in w.models}

    def add_listener(self, cb: Callable[[], None]) -> None:
        pass


def _err(code: ErrorCode, details: str = "boom") -> MeshError:
    return MeshError(details, code=code)


Script = list[bytes | MeshError]  # messages to return, or an error to raise


@dataclass
class FakeHandle:
    """An in-memory CallHandle."""

    worker_id: str
    script: Script
    cancelled: bool = False
    trailing: tuple[tuple[str, str | bytes], ...] = ()

    async def read(self) -> bytes | None:
        if not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, MeshError):
            raise item
        return item

    def raw_read(self) -> Awaitable[object]:
        return self.read()

    @property
    def end(self) -> object:
        return None

    def translate(self, exc: Exception) -> MeshError | None:
        return None  # the fake fails with MeshErrors only

    async def trailers(self) -> Trailers:
        return self.trailing

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeTransport:
    scripts: dict[str, list[Script]]
    calls: list[tuple[str, FakeHandle]] = field(default_factory=list)
    trailing: tuple[tuple[str, str | bytes], ...] = ()
    handle: type[FakeHandle] = FakeHandle
    timeouts: list[float | None] = field(default_factory=list)  # each call's, in order

    def call(
        self,
        method: Method,
        worker: WorkerRecord,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> FakeHandle:
        handle = self.handle(worker.worker_id, self.scripts[worker.worker_id].pop(0))
        handle.trailing = self.trailing
        self.timeouts.append(timeout)
        self.calls.append((worker.worker_id, handle))
        return handle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _router(fleet: list[WorkerRecord], fwd: FakeTransport, clock: Clock | None = None) -> Router:
    return Router(
        fleet=FakeView({w.worker_id: w for w in fleet}),
        transport=fwd,
        policies=Policies(build_policy("least_inflight"), build_policy),
        rng=random.Random(0),
        clock=clock or Clock(),
    )


def _facts(model: str = "m", **kw: Any) -> RequestFacts:
    return RequestFacts(model, request_id="r", **kw)


def _noop(worker_id: str) -> None:
    pass


async def _collect(router: Router, model: str = "m") -> list[bytes]:
    return [
        chunk
        async for chunk in router.generate(
            _facts(model), b"p", time_remaining=lambda: None, metadata=(), on_commit=_noop
        )
    ]


async def test_streams_all_messages_from_one_worker() -> None:
    fwd = FakeTransport({"a": [[b"1", b"2", b"3"]]})
    assert await _collect(_router([_worker("a")], fwd)) == [b"1", b"2", b"3"]


async def test_unknown_model_is_not_found_and_loading_is_unavailable() -> None:
    fwd = FakeTransport({})
    with pytest.raises(NotFound, match="not served by any worker"):
        await _collect(_router([_worker("a")], fwd), model="nope")
    with pytest.raises(Unavailable, match="a=loading"):
        await _collect(_router([_worker("a", ModelState.LOADING)], fwd))
    with pytest.raises(Unavailable, match="draining"):
        await _collect(_router([_worker("a", state=WorkerState.DRAINING)], fwd))


async def test_draining_worker_gets_nothing() -> None:
    fwd = FakeTransport({"b": [[b"ok"]]})
    fleet = [_worker("a", state=WorkerState.DRAINING), _worker("b")]
    assert await _collect(_router(fleet, fwd)) == [b"ok"]
    assert [w for w, _ in fwd.calls] == ["b"]


async def test_fails_over_before_first_message() -> None:
    fwd = FakeTransport(
        {"a": [[_err(ErrorCode.UNAVAILABLE)]], "b": [[_err(ErrorCode.UNAVAILABLE)]]}
    )
    router = _router([_worker("a"), _worker("b")], fwd)
    first = router.rank(_facts(), set())[0].worker_id
    other = "b" if first == "a" else "a"
    fwd.scripts[other] = [[b"x", b"y"]]
    assert await _collect(router) == [b"x", b"y"]
    assert [w for w, _ in fwd.calls] == [first, other]


async def test_client_errors_are_not_retried() -> None:
    fwd = FakeTransport({w: [[_err(ErrorCode.INVALID_ARGUMENT, "bad top_p")]] for w in ("a", "b")})
    with pytest.raises(MeshError, match="bad top_p") as info:
        await _collect(_router([_worker("a"), _worker("b")], fwd))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert len(fwd.calls) == 1


async def test_no_retry_after_first_message() -> None:
    fwd = FakeTransport({w: [[b"1", _err(ErrorCode.UNAVAILABLE)]] for w in ("a", "b")})
    got: list[bytes] = []
    with pytest.raises(MeshError) as info:
        async for c in _router([_worker("a"), _worker("b")], fwd).generate(
            _facts(), b"", time_remaining=lambda: None, metadata=(), on_commit=_noop
        ):
            got.append(c)
    assert got == [b"1"] and len(fwd.calls) == 1
    assert info.value.code is ErrorCode.UNAVAILABLE


async def test_single_worker_failure_reports_its_error() -> None:
    fwd = FakeTransport({"a": [[_err(ErrorCode.UNAVAILABLE, "connection refused")]]})
    with pytest.raises(MeshError, match="connection refused"):
        await _collect(_router([_worker("a")], fwd))


async def test_unavailable_worker_is_ejected_until_the_clock_passes() -> None:
    clock = Clock()
    fwd = FakeTransport({"a": [[_err(ErrorCode.UNAVAILABLE)]], "b": [[b"ok"]]})
    router = _router([_worker("a"), _worker("b")], fwd, clock)
    # Force "a" first by loading "b" with in-flight work.
    router.stats("b").on_send()
    assert router.rank(_facts(), set())[0].worker_id == "a"
    router.stats("b").on_done()
    router.stats("b").on_send()
    assert await _collect(router) == [b"ok"]
    router.stats("b").on_done()
    router.stats("b").on_send()  # b busier, but a is ejected
    assert router.rank(_facts(), set())[0].worker_id == "b"
    clock.now += 6.0
    assert router.rank(_facts(), set())[0].worker_id == "a"


async def test_least_inflight_spreads_load() -> None:
    fwd = FakeTransport({})
    router = _router([_worker("a"), _worker("b")], fwd)
    router.stats("a").on_send()
    assert router.rank(_facts(), set())[0].worker_id == "b"
    router.stats("b").on_send()
    router.stats("b").on_send()
    assert router.rank(_facts(), set())[0].worker_id == "a"


async def test_consumer_cancel_cancels_the_worker_call() -> None:
    fwd = FakeTransport({"a": [[b"1", b"2", b"3"]]})
    router = _router([_worker("a")], fwd)
    gen = router.generate(_facts(), b"", time_remaining=lambda: None, metadata=(), on_commit=_noop)
    assert await gen.__anext__() == b"1"
    await gen.aclose()
    assert fwd.calls[0][1].cancelled
    assert router.inflight("a") == 0


async def test_load_reports_feed_the_candidates() -> None:
    from meshserve import load

    report = load.encode(load.LoadSnapshot(inflight=7, queue_depth=3, capacity=8, slots=4))
    fwd = FakeTransport({"a": [[b"1"]]}, trailing=((load.LOAD_KEY, report),))
    router = _router([_worker("a")], fwd)
    assert await _collect(router) == [b"1"]
    st = router.stats("a")
    assert (st.reported_inflight, st.queue_depth, st.slots) == (7, 3, 4)
    assert st.sent_since_report == 0 and st.inflight == 0
    assert st.service_time["m"] >= 0.0
    st.on_send()
    cand = router.rank(_facts(), set())
    assert cand[0].worker_id == "a"


async def test_full_fleet_queues_then_proceeds_when_a_call_finishes() -> None:
    fwd = FakeTransport({"a": [[b"x"], [b"y"]]})
    router = _router([_worker("a")], fwd)  # capacity 4
    st = router.stats("a")
    for _ in range(4):
        st.on_send()  # four calls of ours already there: the worker is full
    task = asyncio.create_task(_collect(router))
    await settle(lambda: not (router.admission.waiting < 1))
    assert not task.done()
    st.on_done()  # one of those calls finishes
    router.admission.notify("m")
    assert await asyncio.wait_for(task, 5) == [b"x"]


async def test_full_fleet_past_the_deadline_is_resource_exhausted() -> None:
    fwd = FakeTransport({"a": [[b"x"]]})
    router = _router([_worker("a")], fwd)
    for _ in range(4):
        router.stats("a").on_send()
    with pytest.raises(MeshError) as info:
        async for _ in router.generate(
            _facts(), b"", time_remaining=lambda: 0.05, metadata=(), on_commit=_noop
        ):
            pass
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert fwd.calls == []


async def test_per_request_policy_override() -> None:
    from meshserve.errors import InvalidArgument

    router = _router([_worker("a"), _worker("b")], FakeTransport({}))
    rr = [router.rank(_facts(policy="round_robin"), set())[0].worker_id for _ in range(4)]
    assert sorted(rr) == ["a", "a", "b", "b"]  # alternates, whatever the load
    with pytest.raises(InvalidArgument, match="unknown routing policy 'nope'"):
        router.rank(_facts(policy="nope"), set())


def _seq_worker(wid: str, max_sequence_length: int) -> WorkerRecord:
    entry = ModelEntry(
        "m",
        ModelKind.GENERATE,
        ModelState.READY,
        max_sequence_length=max_sequence_length,
    )
    return WorkerRecord(worker_id=wid, address=f"{wid}:1", models=(entry,), capacity=4)


@pytest.mark.parametrize(
    ("need", "expected"),
    [
        (10, {"short", "long", "unknown"}),  # every cache holds it
        (100, {"long", "unknown"}),  # the 64-token one does not; unknown is not excluded
        (5000, {"unknown"}),
    ],
)
def test_requests_go_to_workers_whose_kv_cache_holds_them(need: int, expected: set[str]) -> None:
    fleet = [_seq_worker("short", 64), _seq_worker("long", 2048), _worker("unknown")]
    router = _router(fleet, FakeTransport({}))
    ranked = {w.worker_id for w in router.rank(_facts(min_tokens=need), set())}
    assert ranked == expected


def test_when_no_cache_holds_the_request_every_worker_stays_a_candidate() -> None:
    # The worker then answers INVALID_ARGUMENT with the limit: better than UNAVAILABLE.
    router = _router([_seq_worker("a", 64), _seq_worker("b", 128)], FakeTransport({}))
    ranked = router.rank(_facts(min_tokens=5000), set())
    assert {w.worker_id for w in ranked} == {"a", "b"}


def test_one_inflated_sample_moves_the_estimate_a_bounded_step() -> None:
    from gateway.stats import ALPHA, MAX_JUMP, WorkerStats

    st = WorkerStats()
    st.on_success("m", 0.03, 1.0, None, now=1.0)
    st.on_success("m", 0.30, 1.0, None, now=2.0)  # a stall: 10x
    assert st.service_time["m"] == pytest.approx(0.03 * (1 + ALPHA * (MAX_JUMP - 1)))
    assert st.service_at["m"] == 2.0
    for t in range(3, 12):  # a worker that really slowed down keeps sending slow samples
        st.on_success("m", 0.30, 1.0, None, now=float(t))
    assert st.service_time["m"] > 0.2
    st.on_success("m", 0.003, 1.0, None, now=12.0)  # faster samples are taken in full
    assert st.service_time["m"] < 0.2


async def test_a_workers_not_found_is_retried_and_not_held_against_it() -> None:
    # The view said the worker had the model; it no longer does (stale record).
    fwd = FakeTransport({w: [[_err(ErrorCode.NOT_FOUND, "gone")]] for w in ("a", "b")})
    router = _router([_worker("a"), _worker("b")], fwd)
    first = router.rank(_facts(), set())[0].worker_id
    other = "b" if first == "a" else "a"
    fwd.scripts[other] = [[b"ok"]]
    assert await _collect(router) == [b"ok"]
    assert router.stats(first).error_rate == 0.0


async def test_an_internal_error_counts_against_the_worker_and_is_final() -> None:
    fwd = FakeTransport({w: [[_err(ErrorCode.INTERNAL, "engine")]] for w in ("a", "b")})
    router = _router([_worker("a"), _worker("b")], fwd)
    with pytest.raises(MeshError, match="engine"):
        await _collect(router)
    ((wid, _),) = fwd.calls
    assert router.stats(wid).error_rate > 0.0


class _Foreign(Exception):
    """A transport's own failure (what grpc.aio.AioRpcError is to the forwarder)."""


@dataclass
class ForeignFailingHandle(FakeHandle):
    def raw_read(self) -> Awaitable[object]:
        async def fail() -> object:
            raise _Foreign("stream reset")

        return fail()

    def translate(self, exc: Exception) -> MeshError | None:
        if isinstance(exc, _Foreign):
            return MeshError(
                f"worker {self.worker_id} unavailable: {exc}", code=ErrorCode.UNAVAILABLE
            )
        return None


async def test_a_transport_failure_mid_stream_is_translated_and_held_against_the_worker() -> None:
    fwd = FakeTransport({"a": [[b"1", b"2"]]})
    router = _router([_worker("a")], fwd)
    original = fwd.call

    def call(*args: Any, **kw: Any) -> FakeHandle:
        h = original(*args, **kw)
        return ForeignFailingHandle(h.worker_id, h.script)

    fwd.call = call  # type: ignore[method-assign]
    got: list[bytes] = []
    with pytest.raises(MeshError, match="stream reset") as info:
        async for c in router.generate(
            _facts(), b"", time_remaining=lambda: None, metadata=(), on_commit=_noop
        ):
            got.append(c)
    assert got == [b"1"] and info.value.code is ErrorCode.UNAVAILABLE
    assert router.stats("a").error_rate > 0 and router.ejected("a")
