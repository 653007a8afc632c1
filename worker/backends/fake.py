"""FakeBackend: an engine's timing with no model, to measure the scheduler without GPUs.

A request waits FIFO for one of `slots`, spends a per-request time (the time to first
token, or an Infer call), then emits `max_tokens` tokens `per_token_ms` apart. All times
are divided by `speed`. Numbers measured on it describe the mesh, not any model: say
they come from the FakeBackend. Options (strings in `ModelSpec.options`): see
fake_options.FakeOptions.
"""

from __future__ import annotations

import asyncio
import math
import random
import zlib
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Protocol

from meshserve.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
)
from meshserve.vocab import Device
from worker.backends.base import GenerateBackend, InferBackend
from worker.backends.detok import StopMatcher
from worker.backends.fake_options import parse_fake_options
from worker.backends.requests import continuation_ids, replay, validate_sampling
from worker.types import (
    BackendLoad,
    Capabilities,
    FinishReason,
    GenerateChunk,
    GenerateInput,
    InferInput,
    InferOutput,
    ModelSpec,
    SamplingParams,
    Usage,
)

_VOCAB = 32000  # fake token ids lie in [0, _VOCAB)


def service_plan(request_ms: float, token_ms: float, n_tokens: int, speed: float) -> list[float]:
    """Seconds after service start at which each token is due, at a constant speed."""
    plan, t = [], request_ms / 1000 / speed
    for _ in range(n_tokens):
        plan.append(t)
        t += token_ms / 1000 / speed
    return plan


class Clock(Protocol):
    """Where the backend reads time and sleeps; tests inject a virtual one."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class LoopClock:
    """The running loop's clock (what its timers use, so deadlines do not drift)."""

    # Selector loops round epoll/select timeouts up to whole milliseconds, so wakeups
    # come 0-1 ms late (0.6 ms on average); waking half of that early centres the error.
    # uvloop's timers are already centred and need none.
    _SELECTOR_EARLY_S = 0.0005

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        early = (
            self._SELECTOR_EARLY_S
            if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
            else 0.0
        )
        # sleep(0) when due: still yield, so zero-time tokens cannot starve the loop.
        await asyncio.sleep(max(0.0, deadline - loop.time() - early))


def _validate(request: GenerateInput) -> int:
    """Check what a real engine would; return the prompt's token count."""
    validate_sampling(request.sampling)
    if (request.prompt is None) == (request.prompt_token_ids is None):
        raise InvalidArgument("set exactly one of prompt and prompt_token_ids")
    if request.prompt_token_ids is not None:
        if not request.prompt_token_ids:
            raise InvalidArgument("prompt_token_ids is empty: give at least one token id")
        return len(request.prompt_token_ids)
    if not request.prompt:
        raise InvalidArgument("the prompt is empty")
    return max(1, len(request.prompt.split()))  # whitespace "tokens": cheap, good enough


def _text(tid: int) -> str:
    return f" tok{tid}"


def _never(tid: int) -> bool:
    return False  # the fake vocabulary has no end-of-sequence token


def token_id(base: int, index: int) -> int:
    """The fake engine's `index`-th token for a request whose ids derive from `base`."""
    return (base * 2654435761 + index * 40503) % _VOCAB


class FakeBackend(GenerateBackend, InferBackend):
    """A simulated engine: FIFO slots, timed tokens, injectable failures. No model."""

    def __init__(self, spec: ModelSpec, *, clock: Clock | None = None) -> None:
        self.spec = spec
        self.options = parse_fake_options(spec.options)
        self._clock: Clock = clock or LoopClock()
        self._rng = random.Random(self.options.seed)
        self._speed = self.options.speed
        self._error_rate = self.options.error_rate
        self._hang_rate = self.options.hang_rate
        self._loaded = False
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._idle = asyncio.Event()
        self._idle.set()
        self.steps_total = 0  # tokens emitted plus Infer calls served
        self._aborted: set[str] = set()
        self._live: set[str] = set()  # request ids generating now

    # -- lifecycle and runtime control ----------------------------------------
    async def load(self, device: Device) -> Capabilities:
        self._loaded = True
        return Capabilities(self.options.slots)

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._live:
            return False
        self._aborted.add(request_id)  # seen before the next token
        return True

    async def unload(self) -> None:
        self._loaded = False

    def set_speed(self, factor: float) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise InvalidArgument(f"speed must be a finite number > 0, got {factor}")
        self._speed = factor

    def set_error_rate(self, p: float) -> None:
        self._error_rate = self._probability("error_rate", p)

    def set_hang_rate(self, p: float) -> None:
        self._hang_rate = self._probability("hang_rate", p)

    @staticmethod
    def _probability(name: str, p: float) -> float:
        if not 0.0 <= p <= 1.0:
            raise InvalidArgument(f"{name} must be a probability in [0, 1], got {p}")
        return p

    # -- load --------------------------------------------------------------------
    @property
    def active_requests(self) -> int:
        return self._running

    @property
    def waiting_requests(self) -> int:
        return len(self._waiters)

    def load_report(self) -> BackendLoad:
        slots = self.options.slots
        return BackendLoad(
            running=self._running,
            waiting=len(self._waiters),
            kv_cache_use=self._running / slots,
            capacity=slots,
        )

    async def wait_idle(self) -> None:
        """Return once no request runs or waits."""
        await self._idle.wait()

    # -- slots -------------------------------------------------------------------
    async def _acquire(self) -> float:
        """Take a slot (FIFO); returns the seconds spent waiting for it."""
        if not self._loaded:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        if self._running < self.options.slots and not self._waiters:
            self._running += 1
            self._idle.clear()
            return 0.0
        if len(self._waiters) >= self.options.max_queue:
            raise ResourceExhausted(
                f"model {self.spec.name}: engine queue full "
                f"({len(self._waiters)} waiting, max_queue={self.options.max_queue})"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._idle.clear()
        waited_from = self._clock.now()
        try:
            await fut  # _release hands its slot over: _running already counts us
            return self._clock.now() - waited_from
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release()  # granted just as we were cancelled: pass it on
            else:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                self._update_idle()
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():  # skip waiters cancelled but not yet woken
                fut.set_result(None)
                return
        self._running -= 1
        self._update_idle()

    def _update_idle(self) -> None:
        if self._running == 0 and not self._waiters:
            self._idle.set()

    async def _serve_start(self, work_ms: float | None = None) -> float:
        """In a slot: maybe hang, then wait the per-request time, maybe fail.

        Returns the deadline the per-request time ended at (token 1 is due then).
        """
        start = self._clock.now()
        if self._rng.random() < self._hang_rate:
            await asyncio.get_running_loop().create_future()  # until cancelled
        ms = self._request_ms() if work_ms is None else work_ms
        deadline = start + ms / 1000 / self._speed
        await self._clock.sleep_until(deadline)
        if self._rng.random() < self._error_rate:
            raise Internal("injected failure")
        return deadline

    def _request_ms(self) -> float:
        o = self.options
        if o.per_request_ms == 0 or o.distribution == "fixed":
            return o.per_request_ms
        if o.distribution == "exponential":
            return self._rng.expovariate(1 / o.per_request_ms)
        # lognormal with mean per_request_ms: E[X] = exp(mu + sigma^2 / 2).
        mu = math.log(o.per_request_ms) - o.sigma**2 / 2
        return self._rng.lognormvariate(mu, o.sigma)

    # -- requests ----------------------------------------------------------------
    async def generate(self, request: GenerateInput) -> AsyncGenerator[GenerateChunk, None]:
        prompt_tokens = _validate(request)
        # A resumed stream goes on at position len(continuation): its tokens are a
        # function of (seed, position), so it yields what the unbroken stream would.
        continued = continuation_ids(request, model=self.spec.name, vocab_size=_VOCAB)
        stopper = StopMatcher(request.sampling.stop)
        replay(continued, _text, stopper, _never)
        queue_s = await self._acquire()
        held = True
        rid = request.request_id
        self._live.add(rid)
        try:
            deadline = await self._serve_start()
            params: SamplingParams = request.sampling
            base = (
                params.seed if params.seed is not None else zlib.crc32(request.request_id.encode())
            )
            last, first = params.max_tokens - 1, len(continued)
            for i in range(first, params.max_tokens):
                if i > first:
                    # Absolute deadlines: sleep overshoot never accumulates. Speed is read
                    # per token so set_speed applies from the next one.
                    deadline += self.options.per_token_ms / 1000 / self._speed
                    await self._clock.sleep_until(deadline)
                if rid in self._aborted:
                    raise Cancelled(f"request {rid} aborted by the worker")
                self.steps_total += 1
                tid = token_id(base, i)
                text, stopped = stopper.feed(_text(tid))
                if stopped or i == last:
                    if not stopped:
                        text += stopper.flush()  # generation ended: no stop can complete
                    # The work is done: free the slot now, not when the consumer closes us.
                    held = False
                    self._release()
                    yield GenerateChunk(
                        text=text,
                        token_ids=(tid,),
                        finish=FinishReason.STOP if stopped else FinishReason.LENGTH,
                        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=i + 1),
                        queue_s=queue_s,
                    )
                    return
                yield GenerateChunk(text=text, token_ids=(tid,))
        finally:
            self._live.discard(rid)
            self._aborted.discard(rid)
            if held:  # cancelled, closed early or failed: free the slot at once
                self._release()

    async def infer(self, request: InferInput) -> InferOutput:
        if not request.inputs:
            raise InvalidArgument(f"model {self.spec.name}: give at least one input to echo")
        if request.outputs and tuple(request.outputs) != ("output",):
            raise InvalidArgument(
                f"model {self.spec.name} has one output, 'output'; "
                f"requested {list(request.outputs)}"
            )
        work_ms = _work_ms(request)
        if work_ms is None:
            work_ms = self._request_ms()
        queue_s = await self._acquire()
        try:
            await self._serve_start(work_ms)
            self.steps_total += 1
        finally:
            self._release()
        mean = self.options.per_request_ms
        return InferOutput(
            outputs=(replace(request.inputs[0], name="output"),),
            queue_s=queue_s,
            # What the call cost relative to a typical one (what token counts are to
            # an LLM): lets gateways learn speed per unit of work, not per call.
            work=work_ms / mean if mean > 0 else 1.0,
        )


WORK_INPUT = "fake_work_ms"  # optional scalar input: this call's work, in ms at speed 1


def _work_ms(request: InferInput) -> float | None:
    """The caller-chosen work of an Infer call, so that benchmark arms can replay the
    same job sizes; None to draw from the configured distribution."""
    for t in request.inputs:
        if t.name != WORK_INPUT:
            continue
        if t.array is None or t.array.size != 1:
            raise InvalidArgument(f"input {WORK_INPUT!r} must be one number (milliseconds)")
        ms = float(t.array.reshape(-1)[0])
        if not 0.0 <= ms <= 60_000.0:
            raise InvalidArgument(f"input {WORK_INPUT!r} must be within 0..60000 ms, got {ms}")
        return ms
    return None
