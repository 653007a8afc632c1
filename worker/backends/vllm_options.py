"""The vLLM backend's spec options, validated without vllm installed (unit-testable)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshserve.errors import FailedPrecondition, InvalidArgument
from meshserve.vocab import Device
from worker.types import ModelSpec

DEFAULT_MAX_NUM_SEQS = 256  # vLLM's own default, for specs with max_concurrency 0


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _gib(text: str) -> int:
    return int(float(text) * 2**30)


# option name -> (AsyncEngineArgs field, parser)
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "max_model_len": ("max_model_len", int),
    "max_num_seqs": ("max_num_seqs", int),
    "max_num_batched_tokens": ("max_num_batched_tokens", int),
    "dtype": ("dtype", str),
    "gpu_memory_utilization": ("gpu_memory_utilization", float),
    "kv_cache_memory_gib": ("kv_cache_memory_bytes", _gib),
    "enforce_eager": ("enforce_eager", _bool),
    "enable_prefix_caching": ("enable_prefix_caching", _bool),
    "block_size": ("block_size", int),
    "seed": ("seed", int),
    "tensor_parallel_size": ("tensor_parallel_size", int),
    "quantization": ("quantization", str),
}


def engine_kwargs(spec: ModelSpec, device: Device) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for `spec` on `device` (validated, no vllm needed)."""
    if spec.path is None or not Path(spec.path).is_dir():
        raise FailedPrecondition(f"model {spec.name}: directory {spec.path!r} does not exist")
    kwargs: dict[str, Any] = {
        "model": spec.path,
        "max_num_seqs": spec.max_concurrency or DEFAULT_MAX_NUM_SEQS,
        # Stats still flow to this backend's own logger (load_report); this turns off
        # vLLM's periodic log lines only.
        "disable_log_stats": True,
        "enable_log_requests": False,
    }
    unknown = sorted(set(spec.options) - set(_OPTIONS))
    if unknown:
        raise InvalidArgument(
            f"model {spec.name}: unknown vllm options {unknown}; allowed: {sorted(_OPTIONS)}"
        )
    for key, text in spec.options.items():
        field, parse = _OPTIONS[key]
        try:
            kwargs[field] = parse(text)
        except ValueError as e:
            raise InvalidArgument(f"model {spec.name}: option {key}={text!r}: {e}") from e
    if device.kind == "cuda" and device.index != 0:
        # vLLM uses the first visible GPU: run one worker per GPU with its
        # CUDA_VISIBLE_DEVICES set, and give it --device cuda:0.
        raise FailedPrecondition(
            f"model {spec.name}: the vllm backend serves cuda:0 of the visible devices; "
            f"start this worker with CUDA_VISIBLE_DEVICES={device.index} and --device cuda:0"
        )
    if device.kind not in ("cpu", "cuda"):
        raise FailedPrecondition(f"model {spec.name}: vllm does not run on {device.kind}")
    return kwargs
