"""In-process references for the GPU check: Hugging Face `generate` on a static cache
(compiled by transformers), and a bare decode loop: the model's forward (with a greedy
argmax on the device) compiled with torch.compile(mode="reduce-overhead") on a
transformers StaticCache, no `generate` machinery.

Each reference is prepared first (compile and one full warm-up run: slow, done while
the mesh processes start) and measured later, when nothing else uses the device.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bench.stats import median


@dataclass
class RefResult:
    name: str
    batch: int
    new_tokens: int
    ms_per_step: float
    tokens_per_s: float
    ttft_ms: float
    runs: int
    prepare_s: float
    compiled: bool
    samples_ms_per_step: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(
    ref: Any, runs: int, steps: list[float], tps: list[float], ttft: list[float]
) -> RefResult:
    """Medians of one reference's timed runs (`ref`: either reference below)."""
    return RefResult(
        name=ref.name,
        batch=ref.batch,
        new_tokens=ref.new_tokens,
        ms_per_step=median(steps),
        tokens_per_s=median(tps),
        ttft_ms=median(ttft),
        runs=runs,
        prepare_s=ref.prepare_s,
        compiled=ref.compiled,
        samples_ms_per_step=steps,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """Prefill (eager) + greedy decode steps, each one call of the compiled step."""

    name = "bare compiled loop"

    def __init__(
        self,
        model: Any,
        prompts: list[list[int]],
        new_tokens: int,
        device: torch.device,
        *,
        compile_step: bool,
        fullgraph: bool = True,
    ) -> None:
        transformers: Any = importlib.import_module("transformers")
        self.model = model
        self.device = device
        self.batch = len(prompts)
        self.new_tokens = new_tokens
        self.compiled = compile_step
        self.ids = torch.tensor(prompts, dtype=torch.long, device=device)
        max_len = self.ids.shape[1] + new_tokens
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
        self.out = torch.zeros((self.batch, new_tokens), dtype=torch.long, device=device)
        cache = self.cache

        def step(tokens: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = model(
                input_ids=tokens, past_key_values=cache, use_cache=True
            ).logits
            return logits[:, -1, :].argmax(dim=-1, keepdim=True)

        self.step: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(step, mode="reduce-overhead", fullgraph=fullgraph, dynamic=False)
            if compile_step
            else step
        )
        self.prepare_s = 0.0

    def _run(self) -> tuple[float, float, float]:
        """One generation: (start, first token ready, last token ready), perf_counter."""
        use_graphs = self.compiled and self.device.type == "cuda"
        with torch.no_grad():
            self.cache.reset()
            _sync(self.device)
            t0 = time.perf_counter()
            logits = self.model(
                input_ids=self.ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1
            ).logits
            self.out[:, 0:1] = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            _sync(self.device)
            t1 = time.perf_counter()
            for i in range(1, self.new_tokens):
                if use_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
                self.out[:, i : i + 1] = self.step(self.out[:, i - 1 : i])
            _sync(self.device)
            t2 = time.perf_counter()
        return t0, t1, t2

    def prepare(self) -> float:
        t = time.perf_counter()
        self._run()  # compiles, warms up, records the CUDA graph
        self._run()
        self.prepare_s = time.perf_counter() - t
        return self.prepare_s

    def measure(self, runs: int) -> RefResult:
        self._run()  # re-warm: another graph may have replayed since
        steps, tps, ttft = [], [], []
        for _ in range(runs):
            t0, t1, t2 = self._run()
            steps.append((t2 - t1) / max(1, self.new_tokens - 1) * 1e3)
            tps.append(self.batch * self.new_tokens / (t2 - t0))
            ttft.append((t1 - t0) * 1e3)
        return _result(self, runs, steps, tps, ttft)


class StaticGenerate:
    """`model.generate(cache_implementation="static")`, greedy, EOS disabled; compiled by
    transformers on CUDA (its CompileConfig, with dynamic=False so batch 1 and 32 each get
    a static graph). TTFT = T(1 token); ms/step = (T(n) - T(n/4)) / (n - n/4): every call
    allocates a new static cache (and re-records the CUDA graphs), which cancels out;
    tokens/s = batch * n / T(n), all of it included."""

    name = "static generate"

    def __init__(
        self,
        model: Any,
        prompts: list[list[int]],
        new_tokens: int,
        device: torch.device,
        *,
        compile_step: bool,
        pad_id: int,
    ) -> None:
        transformers: Any = importlib.import_module("transformers")
        self.model = model
        self.device = device
        self.batch = len(prompts)
        self.new_tokens = new_tokens
        # transformers compiles the decode step on CUDA only (its auto-compile criteria).
        self.compiled = compile_step and device.type == "cuda"
        self.ids = torch.tensor(prompts, dtype=torch.long, device=device)
        self.mask = torch.ones_like(self.ids)
        kwargs: dict[str, Any] = {
            "do_sample": False,
            "cache_implementation": "static",
            "pad_token_id": pad_id,
            "eos_token_id": None,
        }
        if self.compiled:
            kwargs["compile_config"] = transformers.CompileConfig(dynamic=False)
        else:
            kwargs["disable_compile"] = True
        self._config = transformers.GenerationConfig
        self._kwargs = kwargs
        self.prepare_s = 0.0

    def _generate(self, new_tokens: int) -> float:
        config = self._config(max_new_tokens=new_tokens, min_new_tokens=new_tokens, **self._kwargs)
        with torch.no_grad():
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.model.generate(
                input_ids=self.ids, attention_mask=self.mask, generation_config=config
            )
            _sync(self.device)
            t1 = time.perf_counter()
        got = int(out.shape[1]) - int(self.ids.shape[1])
        if got != new_tokens:
            raise RuntimeError(f"generate returned {got} new tokens, expected {new_tokens}")
        return t1 - t0

    @property
    def _mid(self) -> int:
        return max(2, self.new_tokens // 4)

    def prepare(self) -> float:
        t = time.perf_counter()
        self._generate(self.new_tokens)  # compiles and records the graphs
        self._generate(self.new_tokens)
        self._generate(self._mid)
        self._generate(1)
        self.prepare_s = time.perf_counter() - t
        return self.prepare_s

    def measure(self, runs: int) -> RefResult:
        self._generate(self.new_tokens)  # re-warm
        steps, tps, ttft = [], [], []
        for _ in range(runs):
            full = self._generate(self.new_tokens)
            mid = self._generate(self._mid)
            first = self._generate(1)
            steps.append((full - mid) / max(1, self.new_tokens - self._mid) * 1e3)
            tps.append(self.batch * self.new_tokens / full)
            ttft.append(first * 1e3)
        return _result(self, runs, steps, tps, ttft)
