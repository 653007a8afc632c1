"""The mesh's shared vocabulary: each concept declared once, used by worker, registry and
gateway alike, and converted to protobuf only at the edges (`meshserve.wire`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ModelKind(enum.Enum):
    """What a model does; decides which RPC serves it."""

    GENERATE = "generate"
    INFER = "infer"


class ModelState(enum.Enum):
    """Lifecycle of one model on one worker."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


class WorkerState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"


@dataclass(frozen=True)
class Device:
    """The accelerator a worker is pinned to."""

    kind: str = "cpu"  # cpu | cuda | mps
    index: int = 0
    name: str = ""
    memory_bytes: int = 0

    @property
    def label(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"
