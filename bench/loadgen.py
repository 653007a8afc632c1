"""A load generator in a process of its own: grpc.aio on uvloop, jobs `module:function`.

It never shares a GIL or an event loop with the processes it measures, and one process
serves every phase, so its interpreter, imports and loop are warm between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing as mp
import os
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

JobFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _loadgen_main(conn: Connection, cpus: list[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))
    import uvloop

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg is None:
                return
            target, job = msg
            module, _, fn_name = target.partition(":")
            fn: JobFn = getattr(importlib.import_module(module), fn_name)
            try:
                result = await fn(job)
                conn.send(("ok", result))
            except Exception as exc:  # reported to the parent, which raises it
                conn.send(("error", f"{type(exc).__name__}: {exc}"))

    uvloop.run(serve())


class LoadGen:
    """Runs jobs `module:function(dict) -> dict` in its process, one at a time."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_loadgen_main,
            args=(child, sorted(cpus) if cpus is not None else None),
            name="bench-loadgen",
            daemon=True,
        )
        self._proc.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    async def run(self, target: str, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._conn.send((target, job))
        ready = await loop.run_in_executor(None, self._conn.poll, timeout_s)
        if not ready:
            raise TimeoutError(f"load generator job {target} took over {timeout_s:.0f}s")
        status, payload = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"load generator job {target} failed: {payload}")
        result: dict[str, Any] = payload
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(None)
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
