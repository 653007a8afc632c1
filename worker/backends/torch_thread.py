"""What the torch backends share: one dedicated thread per model for all torch work
(the event loop never blocks on a forward pass), loading, unloading, error mapping."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from meshserve.errors import FailedPrecondition, Internal, MeshError, ResourceExhausted
from meshserve.vocab import Device
from worker.backends.base import BackendBase
from worker.types import BackendLoad, Capabilities, ModelSpec

T = TypeVar("T")


def torch_device(device: Device) -> torch.device:
    return torch.device("cpu" if device.kind == "cpu" else f"{device.kind}:{device.index}")


class TorchThreadBackend(BackendBase):
    """Base of the torch backends; subclasses implement `_load_sync(device)` and
    `capabilities()`."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._executor: ThreadPoolExecutor | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._active = 0  # requests in this backend now

    def _load_sync(self, device: torch.device) -> None:
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def load_report(self) -> BackendLoad:
        """No engine queue: everything admitted runs (the host caps it at admission)."""
        n = self.spec.max_concurrency
        return BackendLoad(running=self._active, waiting=0, kv_cache_use=0.0, capacity=n)

    async def load(self, device: Device) -> Capabilities:
        if self._executor is not None:
            raise FailedPrecondition(f"model {self.spec.name} is already loaded")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"torch-{self.spec.name}")
        try:
            await self._run(self._load_sync, torch_device(device))
        except BaseException:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            raise
        return self.capabilities()

    async def unload(self) -> None:
        executor = self._executor
        if executor is None:
            return
        await self._run(self._free_sync)
        self._executor = None
        executor.shutdown(wait=False)  # the free job was the last one

    def _free_sync(self) -> None:
        self._model = None
        self._tokenizer = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the backend thread; turn foreign errors into MeshErrors."""
        if self._executor is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except MeshError:
            raise
        except Exception as e:
            raise map_error(self.spec.name, e) from e


def map_error(model: str, e: BaseException) -> MeshError:
    """A torch-side failure as the error a client sees."""
    if isinstance(e, MeshError):
        return e
    if isinstance(e, torch.OutOfMemoryError):
        return ResourceExhausted(f"model {model}: out of device memory")
    return Internal(f"model {model}: {type(e).__name__}: {e}")
