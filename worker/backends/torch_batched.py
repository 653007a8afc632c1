"""Continuous batching for torch causal LMs: requests join and leave the running batch
at every decode step, over a static KV cache (worker/backends/kv_runner.py).

One engine loop runs on the backend's torch thread while there is work. Each turn it
prefills the requests waiting for a slot (one batched forward), launches the next
decode step for every running row, then turns the previous step's tokens into text
and hands all chunks to the event loop in one call. On CUDA the step is launched
before the host looks at the last one, so the GPU never waits for detokenisation.
Models the runner cannot run fall back to the sequential engine (torch_lm.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from functools import partial

import torch

from meshserve.errors import Cancelled, InvalidArgument, MeshError
from worker.backends.batched_state import Seq, Step, fan_out, option_int
from worker.backends.draws import uniform
from worker.backends.kv_runner import StaticKVRunner, unsupported_reason
from worker.backends.requests import validate_sampling
from worker.backends.torch_lm import (
    _MIN_TEMPERATURE,
    TorchCausalLM,
    _Request,
    emit_token,
)
from worker.backends.torch_thread import map_error
from worker.observe import NO_ENGINE_OBSERVER, EngineObserver
from worker.types import BackendLoad, Capabilities, GenerateChunk, GenerateInput, ModelSpec

log = logging.getLogger(__name__)

# Prompt tokens per prefill forward: bounds the activation memory of a burst of joins.
_PREFILL_TOKENS = 8192
_DEFAULT_SLOTS = 16


class BatchedCausalLM(TorchCausalLM):
    """A Hugging Face causal LM served with continuous batching (`engine: batched`)."""

    def __init__(self, spec: ModelSpec, *, observer: EngineObserver = NO_ENGINE_OBSERVER) -> None:
        super().__init__(spec, observer=observer)
        # The batch rows, each with its own KV cache row (0 in the spec: the default).
        self.slots = spec.max_concurrency if spec.max_concurrency > 0 else _DEFAULT_SLOTS
        self._runner: StaticKVRunner | None = None
        self._fallback = ""  # why the sequential engine serves this model
        self._lock = threading.Lock()
        self._pending: deque[Seq] = deque()
        self._rows: list[Seq | None] = [None] * self.slots
        self._loop_running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._host_bufs: list[torch.Tensor] = []
        self._flip = 0
        self.batch_sizes: list[int] = []  # rows per decode step, most recent last (tests)

    def _load_sync(self, device: torch.device) -> None:
        super()._load_sync(device)
        model, _ = self._require_loaded()
        reason = unsupported_reason(model)
        if reason is not None:
            self._fallback = reason
            log.warning("model %s: %s: serving one request per step", self.spec.name, reason)
            return
        default_len = min(self._max_context, 2048)
        max_len = min(option_int(self.spec, "max_cache_len", default_len), self._max_context)
        graphs = self.spec.options.get("cuda_graphs", "auto") != "off"
        compile_opt = self.spec.options.get("compile", "auto")
        if compile_opt not in ("auto", "inductor", "off"):
            raise InvalidArgument(
                f"model {self.spec.name}: option compile={compile_opt!r}; use auto, inductor or off"
            )
        # auto: compile on CUDA, where fused kernels shorten a step by about a third
        # (docs/benchmarks.md); on CPU the compile costs more than it saves.
        compile_step = compile_opt == "inductor" or (
            compile_opt == "auto" and device.type == "cuda"
        )
        try:
            self._runner = StaticKVRunner(
                model, self.slots, max_len, use_graphs=graphs, compile_step=compile_step
            )
            self._runner.warm_up()
        except Exception:
            if not compile_step:
                raise
            log.exception(
                "model %s: compiling the decode step failed; running eager", self.spec.name
            )
            self._runner = StaticKVRunner(model, self.slots, max_len, use_graphs=graphs)
            self._runner.warm_up()
        if device.type == "cuda":
            # The engine thread waits for the GPU with the GIL released; when it wakes
            # it must not queue for 5 ms (the default switch interval) behind the
            # event loop's thread, or the GPU idles between steps.
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
        pin = device.type == "cuda"
        self._host_bufs = [
            torch.zeros(self.slots, dtype=torch.long, pin_memory=pin) for _ in range(2)
        ]

    def _free_sync(self) -> None:
        self._runner = None
        super()._free_sync()

    def capabilities(self) -> Capabilities:
        runner = self._runner
        if runner is None:
            return Capabilities(self.slots, 0, self._max_context)
        return Capabilities(self.slots, runner.slots * runner.max_len, runner.max_len)

    async def abort(self, request_id: str) -> bool:
        """Free the request's row before the next step; its stream ends CANCELLED."""
        found = False
        with self._lock:
            seqs = [*self._pending, *self._rows]
        for seq in seqs:
            if seq is not None and seq.request.request_id == request_id and not seq.cancelled:
                seq.cancelled = True
                seq.out.put_nowait(Cancelled(f"request {request_id} aborted by the worker"))
                found = True
        return found

    @property
    def engine(self) -> str:
        return "sequential" if self._runner is None else "batched"

    @property
    def runner(self) -> StaticKVRunner | None:
        """The batched engine's runner (None when sequential or unloaded): diagnostics."""
        return self._runner

    @property
    def max_sequence_len(self) -> int:
        return self._runner.max_len if self._runner is not None else self._max_context

    def load_report(self) -> BackendLoad:
        runner = self._runner
        if runner is None:
            return BackendLoad(self.active_requests, 0, 0.0, self.slots, 0)
        rows = [s for s in self._rows if s is not None]
        used = sum(min(runner.max_len, s.row_tokens) for s in rows)
        return BackendLoad(
            running=len(rows),
            waiting=len(self._pending),
            kv_cache_use=used / (runner.slots * runner.max_len),
            capacity=self.slots,
            kv_cache_tokens=runner.slots * runner.max_len,
        )

    # -- the consumer's side (event loop) --------------------------------------

    async def generate(self, request: GenerateInput) -> AsyncGenerator[GenerateChunk, None]:
        if self._runner is None:
            async for chunk in super().generate(request):
                yield chunk
            return
        validate_sampling(request.sampling)
        self._require_loaded()
        self._loop = asyncio.get_running_loop()
        seq = Seq(request, asyncio.Queue(), time.monotonic())
        self._active += 1
        try:
            with self._lock:
                self._pending.append(seq)
                self._kick()
            while True:
                item = await seq.out.get()
                if isinstance(item, MeshError):
                    raise item
                yield item
                if item.finish is not None:
                    return
        finally:
            seq.cancelled = True  # the engine frees the row before its next step
            self._active -= 1
            self._wake_idle_waiters()

    def _idle(self) -> bool:
        return self._active == 0 and not self._loop_running

    def _kick(self) -> None:
        """Start the engine loop if it is not running (caller holds the lock)."""
        if self._loop_running or self._executor is None:
            return
        self._loop_running = True
        self._executor.submit(self._engine_sync)

    def _stopped(self) -> None:
        self._call_soon(self._wake_idle_waiters)

    def _deliver(self, items: list[tuple[Seq, GenerateChunk | MeshError]]) -> None:
        if items:
            self._call_soon(partial(fan_out, items))

    def _call_soon(self, fn: Callable[[], None]) -> None:
        try:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    # -- the engine (torch thread) ----------------------------------------------

    def _engine_sync(self) -> None:
        runner = self._runner
        inflight: Step | None = None
        try:
            assert runner is not None
            while True:
                self._reap()
                self._admit(runner)
                launched = self._launch(runner)
                if inflight is not None:
                    self._process(inflight)
                inflight = launched
                if inflight is not None and inflight.ready is None:
                    self._process(inflight)  # CPU: nothing to overlap with
                    inflight = None
                with self._lock:
                    if inflight is None and not self._pending and not any(self._rows):
                        self._loop_running = False
                        self._stopped()
                        return
        except BaseException as e:  # fail every request rather than leave them hanging
            err = e if isinstance(e, MeshError) else map_error(self.spec.name, e)
            log.exception("model %s: engine step failed", self.spec.name)
            with self._lock:
                victims = [s for s in self._rows if s is not None] + list(self._pending)
                self._pending.clear()
                self._rows = [None] * self.slots
                self._loop_running = False
            self._deliver([(s, err) for s in victims])
            self._stopped()

    def _reap(self) -> None:
        for row, seq in enumerate(self._rows):
            if seq is not None and seq.finished:
                self._rows[row] = None

    def _admit(self, runner: StaticKVRunner) -> None:
        free = [r for r, s in enumerate(self._rows) if s is None]
        with self._lock:
            taken = [self._pending.popleft() for _ in range(min(len(free), len(self._pending)))]
        joining: list[tuple[Seq, _Request]] = []
        errors: list[tuple[Seq, GenerateChunk | MeshError]] = []
        budget, back = _PREFILL_TOKENS, []
        for seq in taken:
            if seq.cancelled:
                continue
            try:
                state = self.new_request(seq.request, self._prompt_ids(seq.request, runner.max_len))
            except MeshError as e:
                errors.append((seq, e))
                continue
            if joining and state.context_len > budget:
                back.append(seq)  # next turn, in order
                continue
            budget -= state.context_len
            joining.append((seq, state))
        if back:
            with self._lock:
                self._pending.extendleft(reversed(back))
        self._deliver(errors)
        if not joining:
            return
        now = time.monotonic()
        for (seq, state), row in zip(joining, free, strict=False):
            self._start(runner, seq, state, row, now)
        rows = [seq.row for seq, _ in joining]
        began = time.perf_counter()
        logits = runner.prefill(rows, [st.next_input for _, st in joining])
        rows_t = torch.tensor(rows, dtype=torch.long).to(runner.device)
        first = runner.sample(logits, rows_t, self._uniforms([s for s, _ in joining], runner, 0))
        runner.set_next(rows_t, first)
        self.steps_total += 1
        self._emit([(seq.row, seq) for seq, _ in joining], first.tolist(), offset=False)
        # After the tokens reached the host (tolist waits for the device): real time.
        tokens = sum(st.context_len for _, st in joining)
        self._observer.prefill(self.spec.name, len(joining), tokens, time.perf_counter() - began)

    def _start(
        self, runner: StaticKVRunner, seq: Seq, state: _Request, row: int, now: float
    ) -> None:
        p = seq.request.sampling
        greedy = p.temperature < _MIN_TEMPERATURE
        seq.state = state
        seq.row, seq.scheduled, seq.queue_s = row, 1, now - seq.enqueued
        self._rows[row] = seq
        runner.set_row(row, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, greedy=greedy)

    def _uniforms(self, seqs: list[Seq | None], runner: StaticKVRunner, ahead: int) -> torch.Tensor:
        """One draw per row, of the position its launch samples (greedy rows: unused).

        The position comes from `scheduled`, not from the tokens emitted so far: on
        CUDA a step is launched before the previous one's tokens are processed. A
        prefill samples position `continued + scheduled - 1`, a decode step `ahead`=1
        further."""
        values = [
            uniform(s.state.seed, s.state.continued + s.scheduled - 1 + ahead)
            if s is not None
            and s.state is not None
            and s.request.sampling.temperature >= _MIN_TEMPERATURE
            else 0.0
            for s in seqs
        ]
        return torch.tensor(values).to(runner.device, non_blocking=True)

    def _launch(self, runner: StaticKVRunner) -> Step | None:
        live = [
            (r, s)
            for r, s in enumerate(self._rows)
            if s is not None
            and not s.finished
            and s.state is not None
            and s.scheduled + s.state.continued < s.state.params.max_tokens
        ]
        if not live:
            return None
        began = time.perf_counter()
        batch = runner.batch_bucket(live[-1][0] + 1)
        need = max(s.state.context_len + s.scheduled for _, s in live if s.state is not None)
        logits = runner.decode(batch, runner.length_bucket(need))
        if any(s.request.sampling.temperature >= _MIN_TEMPERATURE for _, s in live):
            runner.apply_sampling(logits, batch, self._uniforms(self._rows[:batch], runner, 1))
        for _, s in live:
            s.scheduled += 1
        self.steps_total += 1
        self.batch_sizes = [*self.batch_sizes[-63:], len(live)]
        host = self._host_bufs[self._flip][:batch]
        self._flip ^= 1
        if runner.device.type != "cuda":
            host.copy_(runner.tokens[:batch])
            return Step(live, host, None, began)
        host.copy_(runner.tokens[:batch], non_blocking=True)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
        return Step(live, host, ready, began)

    def _process(self, step: Step) -> None:
        if step.ready is not None:
            step.ready.synchronize()
        self._emit(step.rows, step.tokens.tolist(), offset=True)
        self._observer.step(self.spec.name, len(step.rows), time.perf_counter() - step.launched)

    def _emit(self, rows: list[tuple[int, Seq]], tokens: list[int], *, offset: bool) -> None:
        """Turn each row's token into its request's next chunk."""
        out: list[tuple[Seq, GenerateChunk | MeshError]] = []
        for i, (row, seq) in enumerate(rows):
            if seq.finished or seq.state is None:
                continue
            chunk = emit_token(seq.state, tokens[row if offset else i], self._eos_ids)
            if chunk.finish is not None:
                chunk = GenerateChunk(
                    chunk.text, chunk.token_ids, chunk.finish, chunk.usage, seq.queue_s
                )
                self._rows[row] = None
            out.append((seq, chunk))
        self._deliver(out)
