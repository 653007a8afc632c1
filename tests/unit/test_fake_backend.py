"""FakeBackend: options, schedule, FIFO slots, failure injection, stop strings, usage.

No wall-time assertions: ordering and counts only, and the schedule through a virtual clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from meshserve.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
)
from meshserve.vocab import Device, ModelKind
from worker.backends import create_backend
from worker.backends.base import Backend
from worker.backends.fake import FakeBackend, service_plan, token_id
from worker.backends.fake_options import FakeOptions, fake_spec, parse_fake_options
from worker.types import (
    BackendLoad,
    DType,
    FinishReason,
    GenerateChunk,
    GenerateInput,
    InferInput,
    ModelSpec,
    SamplingParams,
    TensorData,
    Usage,
)

CPU = Device("cpu")
# Tiny times so real-clock tests finish fast; ordering never depends on them.
FAST = {"per_request_ms": "1", "per_token_ms": "0.2"}


class VirtualClock:
    """Time moves only when the backend sleeps: schedules become exact and instant."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.deadlines: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline: float) -> None:
        self.deadlines.append(deadline)
        self.t = max(self.t, deadline)
        await asyncio.sleep(0)


async def loaded(clock: VirtualClock | None, **options: str) -> FakeBackend:
    backend = FakeBackend(fake_spec("fake-lm", ModelKind.GENERATE, **options), clock=clock)
    await backend.load(CPU)
    return backend


def req(
    rid: str = "r1", prompt: str | None = "a b c", ids: tuple[int, ...] | None = None, **kw: Any
) -> GenerateInput:
    return GenerateInput(rid, "fake-lm", prompt, ids, SamplingParams(**kw))


async def run(backend: FakeBackend, request: GenerateInput) -> list[GenerateChunk]:
    return [c async for c in backend.generate(request)]


async def until(cond: Any) -> None:
    """Yield to the loop until `cond()` holds (bounded, so a bug fails instead of hanging)."""
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.0005)
    raise AssertionError("condition never held")


# -- options -------------------------------------------------------------------
def test_defaults() -> None:
    assert parse_fake_options({}) == FakeOptions()
    o = FakeOptions()
    assert (o.per_request_ms, o.per_token_ms, o.slots, o.max_queue) == (5.0, 2.0, 4, 1024)


def test_options_parse() -> None:
    o = parse_fake_options(
        {"distribution": "lognormal", "sigma": "0.5", "slots": "2", "seed": "-3", "speed": "4"}
    )
    assert (o.distribution, o.sigma, o.slots, o.seed, o.speed) == ("lognormal", 0.5, 2, -3, 4.0)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("per_request_ms", "-1"),
        ("per_token_ms", "fast"),
        ("per_token_ms", "nan"),
        ("distribution", "gamma"),
        ("sigma", "-0.1"),
        ("slots", "0"),
        ("slots", "2.5"),
        ("speed", "0"),
        ("error_rate", "1.5"),
        ("hang_rate", "-0.1"),
        ("seed", "x"),
        ("max_queue", "-1"),
        ("bogus", "1"),
    ],
)
def test_invalid_option_names_it(name: str, raw: str) -> None:
    with pytest.raises(InvalidArgument, match=name):
        parse_fake_options({name: raw})
    with pytest.raises(InvalidArgument, match=name):
        fake_spec("m", ModelKind.GENERATE, **{name: raw})
    with pytest.raises(InvalidArgument, match=name):
        create_backend(ModelSpec("m", ModelKind.GENERATE, "fake", options={name: raw}))


@pytest.mark.parametrize("kind", list(ModelKind))
def test_registered_for_both_kinds(kind: ModelKind) -> None:
    spec = fake_spec("m", kind, slots="3")
    assert (spec.backend, spec.max_concurrency, spec.options) == ("fake", 0, {"slots": "3"})
    backend = create_backend(spec)
    assert isinstance(backend, FakeBackend)
    assert backend.options.slots == 3


def test_runtime_setters_validate() -> None:
    backend = FakeBackend(fake_spec("m"))
    with pytest.raises(InvalidArgument, match="speed"):
        backend.set_speed(0)
    with pytest.raises(InvalidArgument, match="error_rate"):
        backend.set_error_rate(2)
    with pytest.raises(InvalidArgument, match="hang_rate"):
        backend.set_hang_rate(-1)


# -- generation ------------------------------------------------------------------
async def test_tokens_text_and_exact_usage() -> None:
    backend = await loaded(VirtualClock())
    chunks = await run(backend, req(prompt="one two  three\nfour", max_tokens=5, seed=7))
    assert [c.token_ids for c in chunks] == [(token_id(7, i),) for i in range(5)]
    assert "".join(c.text for c in chunks) == "".join(f" tok{token_id(7, i)}" for i in range(5))
    assert [c.finish for c in chunks] == [None] * 4 + [FinishReason.LENGTH]
    assert [c.usage for c in chunks] == [None] * 4 + [Usage(4, 5)]
    assert backend.steps_total == 5
    ids_chunks = await run(backend, req(prompt=None, ids=(1, 2, 3, 4, 5, 6), max_tokens=1))
    assert ids_chunks[-1].usage == Usage(6, 1)
    assert ids_chunks[-1].finish is FinishReason.LENGTH


async def test_ids_deterministic_per_request_id_without_seed() -> None:
    backend = await loaded(VirtualClock())
    a1, a2, b = [await run(backend, req(rid, max_tokens=4)) for rid in ("a", "a", "b")]
    assert [c.token_ids for c in a1] == [c.token_ids for c in a2] != [c.token_ids for c in b]


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (req(max_tokens=0), "max_tokens"),
        (req(prompt=None), "exactly one"),
        (req(ids=(1,)), "exactly one"),
        (req(prompt=None, ids=()), "prompt_token_ids"),
        (req(prompt=""), "empty"),
        (req(stop=("",)), "stop"),
    ],
)
async def test_invalid_request(request_: GenerateInput, match: str) -> None:
    backend = await loaded(VirtualClock())
    with pytest.raises(InvalidArgument, match=match):
        await run(backend, request_)
    assert backend.active_requests == 0


async def test_not_loaded() -> None:
    backend = FakeBackend(fake_spec("m"))
    with pytest.raises(FailedPrecondition):
        await run(backend, req())


async def test_stop_inside_one_token() -> None:
    backend = await loaded(VirtualClock())
    third = f"tok{token_id(3, 2)}"
    chunks = await run(backend, req(max_tokens=10, seed=3, stop=(third,)))
    expected = f" tok{token_id(3, 0)} tok{token_id(3, 1)} "
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish is FinishReason.STOP
    assert chunks[-1].usage == Usage(3, 3)
    assert sum(len(c.token_ids) for c in chunks) == 3


async def test_stop_across_tokens_and_partial_match_released_at_end() -> None:
    backend = await loaded(VirtualClock())
    full = "".join(f" tok{token_id(5, i)}" for i in range(6))
    stop = full[8:20]  # spans token boundaries
    chunks = await run(backend, req(max_tokens=6, seed=5, stop=(stop,)))
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].finish is FinishReason.STOP
    # A stop string that only starts at the end never matches: all text is released.
    chunks = await run(backend, req(max_tokens=6, seed=5, stop=(full[-3:] + "zz",)))
    assert "".join(c.text for c in chunks) == full
    assert chunks[-1].finish is FinishReason.LENGTH


# -- schedule --------------------------------------------------------------------
def test_service_plan() -> None:
    assert service_plan(10, 2, 3, 1.0) == pytest.approx([0.010, 0.012, 0.014])
    assert service_plan(10, 2, 3, 2.0) == pytest.approx([0.005, 0.006, 0.007])


@pytest.mark.parametrize("speed", ["1", "2", "0.5"])
async def test_schedule_follows_plan(speed: str) -> None:
    clock = VirtualClock()
    backend = await loaded(clock, per_request_ms="10", per_token_ms="2", speed=speed)
    start = clock.t
    await run(backend, req(max_tokens=4))
    offsets = [d - start for d in clock.deadlines]
    assert offsets == pytest.approx(service_plan(10, 2, 4, float(speed)))


async def test_set_speed_applies_to_next_token() -> None:
    clock = VirtualClock()
    backend = await loaded(clock, per_request_ms="10", per_token_ms="4")
    gen = backend.generate(req(max_tokens=4))
    await anext(gen)
    await anext(gen)
    backend.set_speed(2.0)
    rest = [c async for c in gen]
    assert rest[-1].finish is FinishReason.LENGTH
    gaps = np.diff(clock.deadlines)
    assert gaps == pytest.approx([0.004, 0.002, 0.002])


async def test_distributions_keep_the_mean() -> None:
    for dist in ("exponential", "lognormal"):
        backend = FakeBackend(fake_spec("m", distribution=dist, per_request_ms="5", seed="1"))
        samples = [backend._request_ms() for _ in range(20_000)]
        assert np.mean(samples) == pytest.approx(5.0, rel=0.1)
        assert min(samples) > 0 and np.std(samples) > 1


# -- slots and queueing -----------------------------------------------------------
async def test_one_slot_serves_fifo() -> None:
    backend = await loaded(None, slots="1", per_request_ms="20", per_token_ms="0.2")
    events: list[tuple[str, int, bool]] = []

    async def consume(rid: str) -> None:
        async for c in backend.generate(req(rid, max_tokens=3)):
            events.append((rid, len(c.token_ids), c.finish is not None))

    first, second = asyncio.create_task(consume("a")), asyncio.create_task(consume("b"))
    await asyncio.sleep(0)  # both tasks take their first step: a holds the slot, b queues
    assert (backend.active_requests, backend.waiting_requests) == (1, 1)
    await asyncio.gather(first, second)
    assert [e[0] for e in events] == ["a"] * 3 + ["b"] * 3
    assert events[2] == ("a", 1, True)
    await asyncio.wait_for(backend.wait_idle(), 1)
    assert (backend.active_requests, backend.waiting_requests) == (0, 0)


async def test_two_slots_run_concurrently_and_report_load() -> None:
    backend = await loaded(None, slots="2", **FAST)
    a, b = backend.generate(req("a", max_tokens=50)), backend.generate(req("b", max_tokens=50))
    await anext(a)
    await anext(b)
    assert backend.active_requests == 2
    assert backend.load_report() == BackendLoad(running=2, waiting=0, kv_cache_use=1.0, capacity=2)
    third = asyncio.create_task(run(backend, req("c", max_tokens=1)))
    await until(lambda: backend.waiting_requests == 1)
    assert backend.load_report().waiting == 1
    await a.aclose()  # closing frees the slot: the waiter starts
    chunks = await asyncio.wait_for(third, 2)
    assert chunks[-1].finish is FinishReason.LENGTH
    await b.aclose()
    await asyncio.wait_for(backend.wait_idle(), 1)
    assert backend.load_report() == BackendLoad(0, 0, 0.0, 2)


async def test_max_queue_rejects_beyond_it() -> None:
    backend = await loaded(None, slots="1", max_queue="1", hang_rate="1")
    running = asyncio.create_task(run(backend, req("a")))
    await until(lambda: backend.active_requests == 1)
    waiting = asyncio.create_task(run(backend, req("b")))
    await until(lambda: backend.waiting_requests == 1)
    with pytest.raises(ResourceExhausted, match="max_queue"):
        await run(backend, req("c"))
    waiting.cancel()  # a cancelled waiter leaves the queue
    await until(lambda: backend.waiting_requests == 0)
    running.cancel()
    await asyncio.wait_for(backend.wait_idle(), 1)
    assert backend.active_requests == 0


async def test_waiter_cancelled_as_it_is_granted_passes_the_slot_on() -> None:
    backend = await loaded(None, slots="1", hang_rate="1")
    a, b = asyncio.create_task(run(backend, req("a"))), asyncio.create_task(run(backend, req("b")))
    await asyncio.sleep(0)
    assert (backend.active_requests, backend.waiting_requests) == (1, 1)
    a.cancel()
    await asyncio.sleep(0)  # a releases: the slot is handed to b, which has not woken yet
    assert (backend.active_requests, backend.waiting_requests) == (1, 0)
    b.cancel()
    await asyncio.gather(a, b, return_exceptions=True)
    assert backend.active_requests == 0
    await asyncio.wait_for(backend.wait_idle(), 1)


# -- failure injection -------------------------------------------------------------
async def test_error_rate_one_fails_before_any_token() -> None:
    backend = await loaded(VirtualClock(), error_rate="1")
    chunks: list[GenerateChunk] = []
    with pytest.raises(Internal, match="injected failure"):
        async for c in backend.generate(req()):
            chunks.append(c)
    assert chunks == [] and backend.active_requests == 0
    backend.set_error_rate(0)
    assert (await run(backend, req(max_tokens=2)))[-1].finish is FinishReason.LENGTH


async def test_hang_until_cancelled_then_slot_freed() -> None:
    backend = await loaded(None, slots="1", hang_rate="1", **FAST)
    chunks: list[GenerateChunk] = []

    async def consume() -> None:
        async for c in backend.generate(req()):
            chunks.append(c)

    task = asyncio.create_task(consume())
    await until(lambda: backend.active_requests == 1)
    await asyncio.sleep(0.02)  # many token times: still nothing
    assert chunks == [] and not task.done()
    idle = asyncio.create_task(backend.wait_idle())
    await asyncio.sleep(0.001)
    assert not idle.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.active_requests == 0
    await asyncio.wait_for(idle, 1)
    backend.set_hang_rate(0)
    assert len(await run(backend, req(max_tokens=2))) == 2


# -- infer -----------------------------------------------------------------------
@pytest.fixture
async def infer_backend() -> AsyncIterator[FakeBackend]:
    backend = FakeBackend(fake_spec("fake-embed", ModelKind.INFER, **FAST))
    await backend.load(CPU)
    yield backend
    await backend.unload()


async def test_infer_echoes_first_input(infer_backend: FakeBackend) -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = TensorData("x", DType.FP32, (2, 3), array=arr)
    y = TensorData("y", DType.STRING, (1,), elements=("hi",))
    out = await infer_backend.infer(InferInput("r", "fake-embed", (x, y)))
    (o,) = out.outputs
    assert (o.name, o.dtype, o.shape) == ("output", DType.FP32, (2, 3))
    assert o.array is not None and np.array_equal(o.array, arr)
    assert infer_backend.steps_total == 1 and infer_backend.active_requests == 0


async def test_infer_rejects_bad_requests_and_injects_errors(infer_backend: FakeBackend) -> None:
    x = TensorData("x", DType.STRING, (1,), elements=("hi",))
    with pytest.raises(InvalidArgument):
        await infer_backend.infer(InferInput("r", "fake-embed", ()))
    with pytest.raises(InvalidArgument, match="output"):
        await infer_backend.infer(InferInput("r", "fake-embed", (x,), outputs=("logits",)))
    infer_backend.set_error_rate(1)
    with pytest.raises(Internal):
        await infer_backend.infer(InferInput("r", "fake-embed", (x,)))
    assert infer_backend.active_requests == 0


async def test_infer_takes_its_work_from_the_request() -> None:
    import numpy as np

    from worker.backends.fake import WORK_INPUT, FakeBackend
    from worker.backends.fake_options import fake_spec
    from worker.types import DType, InferInput, TensorData

    backend = FakeBackend(fake_spec("f", ModelKind.INFER, per_request_ms="1000"))
    await backend.load(Device("cpu"))
    work = TensorData(WORK_INPUT, DType.FP32, (1,), array=np.asarray([0.0], dtype=np.float32))
    # 0 ms of work instead of the configured 1000 ms: returns at once, echoing input 0.
    out = await asyncio.wait_for(backend.infer(InferInput("r", "f", (work,))), 5)
    assert out.outputs[0].name == "output"
    bad = TensorData(WORK_INPUT, DType.FP32, (1,), array=np.asarray([-1.0], dtype=np.float32))
    with pytest.raises(InvalidArgument, match=WORK_INPUT):
        await backend.infer(InferInput("r", "f", (bad,)))


async def test_host_refuses_a_backend_of_the_wrong_kind_and_aborts_on_request() -> None:
    from meshserve.vocab import ModelState
    from worker.backends.torch_embed import TorchEmbedding
    from worker.host import ModelHost

    def factory(spec: ModelSpec) -> Backend:
        if spec.name == "wrong":  # an infer-only backend for a generate model
            return TorchEmbedding(spec)
        return FakeBackend(spec)

    host = ModelHost(device=Device(), capacity=8, factory=factory)
    host.add(fake_spec("wrong"))
    host.add(fake_spec("gen", per_request_ms="0", per_token_ms="1000"))
    await host.load_all()
    states = {st.spec.name: st for st in host.statuses()}
    assert states["wrong"].state is ModelState.FAILED
    assert "cannot serve generate" in states["wrong"].error
    assert states["gen"].state is ModelState.READY and states["gen"].max_concurrency > 0

    stream = host.generate(GenerateInput("r1", "gen", "hi", None, SamplingParams(max_tokens=50)))
    await anext(stream)  # running: the next token is a second away
    assert await host.abort_all() == 1
    with pytest.raises(Cancelled):
        await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert host.inflight == 0
