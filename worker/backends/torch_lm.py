"""Hugging Face causal LMs on torch, decoded token by token with a KV cache.

All torch and tokenizer work runs on one thread owned by the backend, one step at a
time, so the event loop never blocks and concurrent requests interleave step by step
(no batching). Closing a request's iterator stops its decoding before the next step.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from meshserve.errors import (
    FailedPrecondition,
    InvalidArgument,
)
from worker.backends.base import GenerateBackend
from worker.backends.detok import Detokenizer, StopMatcher, detokenizer_factory
from worker.backends.draws import stream_seed, uniform
from worker.backends.requests import continuation_ids, prompt_ids, replay, validate_sampling
from worker.backends.torch_thread import TorchThreadBackend
from worker.observe import NO_ENGINE_OBSERVER, EngineObserver
from worker.types import (
    Capabilities,
    FinishReason,
    GenerateChunk,
    GenerateInput,
    ModelSpec,
    SamplingParams,
    Usage,
)

T = TypeVar("T")


def _transformers() -> Any:
    """transformers, untyped: its annotations are partial and fight strict mypy."""
    return importlib.import_module("transformers")


# Below this, dividing logits by the temperature can overflow: treat it as greedy.
_MIN_TEMPERATURE = 1e-5


def sample_token(logits: torch.Tensor, p: SamplingParams, uniform: float) -> int:
    """Pick the next token from 1-D `logits` (temperature, then top-k, then top-p) by
    inverting the CDF at `uniform`: the draw of this position (worker.backends.draws),
    so a resumed stream draws what the unbroken one would have."""
    if p.temperature < _MIN_TEMPERATURE:
        return int(torch.argmax(logits).item())
    logits = logits.float() / p.temperature
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    order: torch.Tensor | None = None
    if p.top_p < 1.0:
        probs, order = torch.sort(probs, descending=True)
        # Drop a token once the tokens before it already hold top_p: the first always stays.
        probs[(torch.cumsum(probs, 0) - probs) >= p.top_p] = 0.0
    cdf = torch.cumsum(probs, 0)
    target = torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)
    idx = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.numel() - 1)
    pick = order[idx] if order is not None else idx
    return int(pick.item())


@dataclass
class _Request:
    """One generation's decoding state; touched only on the backend thread."""

    params: SamplingParams
    prompt_len: int  # the prompt's tokens (what usage reports)
    next_input: list[int]
    seed: int  # the draws' seed: worker.backends.draws
    detok: Detokenizer
    stopper: StopMatcher
    cache: Any = None  # transformers DynamicCache, created by the first forward pass
    # Counts the continued tokens of a resumed stream too: they are part of the
    # completion (usage, max_tokens) and the next draw's position.
    completion_tokens: int = 0
    continued: int = 0  # tokens of a continuation (already in the cache after prefill)
    done: bool = False

    @property
    def context_len(self) -> int:
        """Tokens before the first one this worker generates (the prefill)."""
        return self.prompt_len + self.continued

    def draw(self) -> float:
        return uniform(self.seed, self.completion_tokens)


class TorchCausalLM(TorchThreadBackend, GenerateBackend):
    """A local Hugging Face causal LM (`spec.path`) served token by token."""

    def __init__(self, spec: ModelSpec, *, observer: EngineObserver = NO_ENGINE_OBSERVER) -> None:
        super().__init__(spec)
        self._observer = observer
        self._eos_ids: frozenset[int] = frozenset()
        self._vocab_size = 0
        self._max_context = 0
        self._forward_kwargs: dict[str, Any] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self.steps_total = 0  # forward passes run (prefill included); tests watch it
        self._detok_factory: Callable[[], Detokenizer] | None = None  # set by load

    def _load_sync(self, device: torch.device) -> None:
        transformers = _transformers()
        transformers.utils.logging.disable_progress_bar()  # no tqdm bars in a server's logs
        if self.spec.path is None or not Path(self.spec.path).is_dir():
            raise FailedPrecondition(
                f"model {self.spec.name}: directory {self.spec.path!r} does not exist"
            )
        if device.type == "cuda":
            # cuDNN SDPA plans each new KV length per thread: 35 vs 2 ms/step on an H200.
            torch.backends.cuda.enable_cudnn_sdp(False)
        dtype = self._dtype(device)
        path = str(self.spec.path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, local_files_only=True
        )
        model.to(device).eval()
        eos: set[int] = set()
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        names = ("max_position_embeddings", "n_positions", "seq_length")
        ctx = next((v for k in names if isinstance(v := getattr(model.config, k, None), int)), 0)
        if ctx <= 0:
            raise FailedPrecondition(f"model {self.spec.name}: config has no context length")
        # Only the last position's logits are needed; older architectures lack the option.
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            self._forward_kwargs = {"logits_to_keep": 1}
        self._device = device
        self._eos_ids = frozenset(eos)
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._max_context = ctx
        self._tokenizer = tokenizer
        self._model = model
        self._detok_factory = detokenizer_factory(tokenizer)

    def _dtype(self, device: torch.device) -> torch.dtype:
        """Option `dtype` (auto, float32, bfloat16, float16); auto: bf16 on CUDA if it can."""
        choice = self.spec.options.get("dtype", "auto")
        if choice == "auto":
            use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if use_bf16 else torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if choice not in dtypes:
            raise InvalidArgument(
                f"model {self.spec.name}: option dtype={choice!r}; use auto or one of "
                f"{', '.join(dtypes)}"
            )
        return dtypes[choice]

    def capabilities(self) -> Capabilities:
        return Capabilities(self.spec.max_concurrency, 0, self._max_context)

    @property
    def active_requests(self) -> int:
        return self._active

    @property
    def max_sequence_len(self) -> int:
        """Longest prompt + completion (0 until loaded)."""
        return self._max_context

    @property
    def vocab_size(self) -> int:
        self._require_loaded()
        return self._vocab_size

    @property
    def max_context(self) -> int:
        self._require_loaded()
        return self._max_context

    @property
    def tokenizer(self) -> Any:
        return self._require_loaded()[1]

    def _idle(self) -> bool:
        return self._active == 0

    async def wait_idle(self) -> None:
        """Until no request is active and the engine has stopped working."""
        while not self._idle():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            await fut

    def _wake_idle_waiters(self) -> None:
        if self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def new_detokenizer(self) -> Detokenizer:
        if self._detok_factory is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        return self._detok_factory()

    def _require_loaded(self) -> tuple[Any, Any]:
        model, tokenizer = self._model, self._tokenizer
        if model is None or tokenizer is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        return model, tokenizer

    async def generate(self, request: GenerateInput) -> AsyncGenerator[GenerateChunk, None]:
        validate_sampling(request.sampling)
        self._require_loaded()
        # max_concurrency is enforced by the worker's ModelHost at admission, not here.
        self._active += 1
        try:
            state = await self._run(self._start_sync, request)
            while True:
                # One forward pass per iteration: when the consumer stops iterating we
                # are suspended at `yield`, so no further step is ever scheduled.
                chunk = await self._run(self._step_sync, state)
                yield chunk
                if chunk.finish is not None:
                    return
        finally:
            self._active -= 1
            self._wake_idle_waiters()

    def _prompt_ids(self, request: GenerateInput, max_len: int | None = None) -> list[int]:
        tokenizer = self._require_loaded()[1]
        return prompt_ids(
            request,
            model=self.spec.name,
            encode=lambda text: list(tokenizer(text).input_ids),
            vocab_size=self._vocab_size,
            context=self._max_context,
            limit=max_len,
        )

    def new_request(self, request: GenerateInput, prompt: list[int]) -> _Request:
        """A request's decoding state; a continuation is replayed into its text state
        and joins the prompt in the prefill (`next_input`)."""
        params = request.sampling
        continued = continuation_ids(request, model=self.spec.name, vocab_size=self._vocab_size)
        st = _Request(
            params=params,
            prompt_len=len(prompt),
            next_input=prompt + continued,
            seed=stream_seed(params.seed),
            detok=self.new_detokenizer(),
            stopper=StopMatcher(params.stop),
            completion_tokens=len(continued),
            continued=len(continued),
        )
        eos = frozenset() if params.ignore_eos else self._eos_ids
        replay(continued, st.detok.add, st.stopper, eos.__contains__)
        return st

    def _start_sync(self, request: GenerateInput) -> _Request:
        return self.new_request(request, self._prompt_ids(request))

    def _step_sync(self, st: _Request) -> GenerateChunk:
        model, _ = self._require_loaded()
        if st.done:
            raise FailedPrecondition("request already finished")
        began = time.perf_counter()
        prefill = st.cache is None
        with torch.inference_mode():
            input_ids = torch.tensor([st.next_input], dtype=torch.long, device=self._device)
            out = model(
                input_ids=input_ids,
                past_key_values=st.cache,
                use_cache=True,
                **self._forward_kwargs,
            )
            st.cache = out.past_key_values
            token = sample_token(out.logits[0, -1], st.params, st.draw())
        seconds = time.perf_counter() - began  # sample_token read the token: real time
        if prefill:
            self._observer.prefill(self.spec.name, 1, len(st.next_input), seconds)
        else:
            self._observer.step(self.spec.name, 1, seconds)
        self.steps_total += 1
        st.next_input = [token]
        chunk = emit_token(st, token, self._eos_ids)
        if chunk.finish is not None:
            st.cache = None  # free the KV cache now, not when the generator is collected
        return chunk


def emit_token(st: _Request, token: int, eos_ids: frozenset[int]) -> GenerateChunk:
    """Account one sampled token: its text (stop strings held back) and whether it ends."""
    # completion_tokens counts every sampled token, a stopping EOS included (it was
    # generated and is in token_ids), but EOS never becomes text.
    st.completion_tokens += 1
    is_eos = token in eos_ids and not st.params.ignore_eos
    text, stopped = st.stopper.feed("" if is_eos else st.detok.add(token))
    finish: FinishReason | None = FinishReason.STOP if stopped else None
    if finish is None and (is_eos or st.completion_tokens >= st.params.max_tokens):
        tail, stopped = st.stopper.feed(st.detok.flush())
        text += tail if stopped else tail + st.stopper.flush()
        finish = FinishReason.STOP if (is_eos or stopped) else FinishReason.LENGTH
    if finish is None:
        return GenerateChunk(text=text, token_ids=(token,))
    st.done = True
    usage = Usage(prompt_tokens=st.prompt_len, completion_tokens=st.completion_tokens)
    return GenerateChunk(text=text, token_ids=(token,), finish=finish, usage=usage)
