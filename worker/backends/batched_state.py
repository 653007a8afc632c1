"""The batched engine's bookkeeping: a request as the engine sees it, a launched step,
the hand-over of chunks to waiting consumers (worker.backends.torch_batched)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from meshserve.errors import InvalidArgument, MeshError
from worker.backends.torch_lm import _Request
from worker.types import GenerateChunk, GenerateInput, ModelSpec


@dataclass(eq=False)
class Seq:
    """One request as the engine sees it."""

    request: GenerateInput
    out: asyncio.Queue[GenerateChunk | MeshError]
    enqueued: float
    state: _Request | None = None
    row: int = -1
    scheduled: int = 0  # tokens whose forward pass was launched
    cancelled: bool = False  # set by the consumer's thread; read by the engine
    queue_s: float = 0.0

    @property
    def row_tokens(self) -> int:
        """Cache positions this request holds."""
        return (self.state.context_len if self.state is not None else 0) + self.scheduled

    @property
    def finished(self) -> bool:
        return self.cancelled or (self.state is not None and self.state.done)


@dataclass
class Step:
    """A launched decode step: which request each row held, and its tokens."""

    rows: list[tuple[int, Seq]]
    tokens: torch.Tensor  # host copy (pinned on CUDA), valid once `ready` fired
    ready: torch.cuda.Event | None
    launched: float  # perf_counter when launched: the step's latency ends at _process


def option_int(spec: ModelSpec, key: str, default: int) -> int:
    raw = spec.options.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(
            f"model {spec.name}: option {key}={raw!r} is not an integer"
        ) from None
    if value < 1:
        raise InvalidArgument(f"model {spec.name}: option {key} must be >= 1, got {value}")
    return value


def fan_out(items: list[tuple[Seq, GenerateChunk | MeshError]]) -> None:
    for seq, item in items:
        seq.out.put_nowait(item)
