"""The backend contract: everything the worker host calls on an engine adapter.

Two protocols, one per kind of model: a `GenerateBackend` streams text, an
`InferBackend` maps tensors to tensors; neither implements the other's method just to
raise. Both share the lifecycle and the questions the host asks (`BackendBase`). Members
with a body are optional behaviour with its no-op default: an adapter that subclasses the
protocol explicitly inherits them. Errors are raised as meshserve.errors.MeshError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from meshserve.vocab import Device
from worker.types import (
    BackendHealth,
    BackendLoad,
    Capabilities,
    GenerateChunk,
    GenerateInput,
    InferInput,
    InferOutput,
    ModelSpec,
)

HEALTHY = BackendHealth()


@runtime_checkable
class BackendBase(Protocol):
    spec: ModelSpec

    async def load(self, device: Device) -> Capabilities:
        """Load the model on `device`; what it can do there."""
        ...

    def load_report(self) -> BackendLoad:
        """How busy the engine is right now (cheap: called for every response)."""
        ...

    async def unload(self) -> None:
        """Free the model's memory; the backend may not be used afterwards."""
        ...

    def health(self) -> BackendHealth:
        """Whether the engine can serve (e.g. not dead after a fatal error)."""
        return HEALTHY

    async def abort(self, request_id: str) -> bool:
        """Drop a request the engine is working on; its stream then ends with
        CANCELLED. False where the engine cannot (closing the request's stream still
        stops it at the next step)."""
        return False


@runtime_checkable
class GenerateBackend(BackendBase, Protocol):
    def generate(self, request: GenerateInput) -> AsyncIterator[GenerateChunk]:
        """An async iterator of chunks: closing it (the consumer stops iterating, or
        its task is cancelled) must stop the engine's work for that request."""
        ...


@runtime_checkable
class InferBackend(BackendBase, Protocol):
    async def infer(self, request: InferInput) -> InferOutput: ...


Backend = GenerateBackend | InferBackend
