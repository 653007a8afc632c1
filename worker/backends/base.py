"""The Backend interface every engine adapter implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from meshserve.vocab import Device
from worker.types import GenerateChunk, GenerateInput, InferInput, InferOutput, ModelSpec


@runtime_checkable
class Backend(Protocol):
    """One loaded model on one device.

    `generate` is an async iterator: closing it (the consumer stops iterating,
    or the task is cancelled) must stop the engine's work for that request.
    Errors are raised as meshserve.errors.MeshError subclasses.
    """

    spec: ModelSpec

    async def load(self, device: Device) -> None: ...

    def generate(self, request: GenerateInput) -> AsyncIterator[GenerateChunk]: ...

    async def infer(self, request: InferInput) -> InferOutput: ...

    async def unload(self) -> None: ...
