"""Engine adapters. Each knows nothing of gRPC; see base.Backend."""

from __future__ import annotations

from meshserve.errors import InvalidArgument
from meshserve.vocab import ModelKind
from worker.backends.base import Backend
from worker.observe import NO_ENGINE_OBSERVER, EngineObserver
from worker.types import ModelSpec

__all__ = ["Backend", "create_backend"]


def create_backend(spec: ModelSpec, *, observer: EngineObserver = NO_ENGINE_OBSERVER) -> Backend:
    """The backend that serves `spec` (not loaded yet: call `load`)."""
    # torch is imported here, not at module level, so importing worker.backends is cheap.
    if spec.backend == "fake":
        from worker.backends.fake import FakeBackend

        return FakeBackend(spec)
    if spec.backend == "torch" and spec.kind is ModelKind.GENERATE:
        engine = spec.options.get("engine", "batched")
        if engine == "batched":
            from worker.backends.torch_batched import BatchedCausalLM

            return BatchedCausalLM(spec, observer=observer)
        if engine == "sequential":
            from worker.backends.torch_lm import TorchCausalLM

            return TorchCausalLM(spec, observer=observer)
        raise InvalidArgument(
            f"model {spec.name}: unknown engine {engine!r}; "
            'use "batched" (continuous batching) or "sequential"'
        )
    if spec.backend == "torch" and spec.kind is ModelKind.INFER:
        from worker.backends.torch_embed import TorchEmbedding

        return TorchEmbedding(spec)
    if spec.backend == "vllm" and spec.kind is ModelKind.GENERATE:
        from worker.backends.vllm import VLLMBackend

        return VLLMBackend(spec)
    raise InvalidArgument(
        f"unknown backend {spec.backend!r} for {spec.kind.value} model {spec.name}; "
        'supported: "torch" and "fake" (generate and infer), "vllm" (generate)'
    )
