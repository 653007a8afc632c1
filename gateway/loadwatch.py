"""Fresh load from workers that have long calls from this gateway in flight.

Trailers report load when a call ends; a worker busy with long streams would go
unreported for their whole length. While this gateway has streams open on a
worker, it keeps one LoadReporting.WatchLoad stream to it (closed again
`linger_s` after the last of them ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from meshserve import load
from meshserve.load import LoadSnapshot
from meshserve.v1 import load_pb2, load_pb2_grpc

log = logging.getLogger(__name__)


class LoadWatcher:
    def __init__(
        self,
        channel: Callable[[str, str], grpc.aio.Channel],
        on_report: Callable[[str, LoadSnapshot], None],
        *,
        interval_ms: int = 100,
        linger_s: float = 1.0,
    ) -> None:
        self._channel = channel
        self._on_report = on_report
        self._interval_ms = interval_ms
        self._linger_s = linger_s
        self._streams: dict[str, int] = {}  # worker -> our open streams there
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unsupported: set[str] = set()

    def stream_started(self, worker_id: str, address: str) -> None:
        self._streams[worker_id] = self._streams.get(worker_id, 0) + 1
        if worker_id not in self._tasks and worker_id not in self._unsupported:
            self._tasks[worker_id] = asyncio.get_running_loop().create_task(
                self._watch(worker_id, address), name=f"load-watch-{worker_id}"
            )

    def stream_ended(self, worker_id: str) -> None:
        n = self._streams.get(worker_id, 0) - 1
        if n > 0:
            self._streams[worker_id] = n
        else:
            self._streams.pop(worker_id, None)

    async def _watch(self, worker_id: str, address: str) -> None:
        loop = asyncio.get_running_loop()
        stub = load_pb2_grpc.LoadReportingStub(self._channel(worker_id, address))
        call = stub.WatchLoad(load_pb2.WatchLoadRequest(interval_ms=self._interval_ms))
        idle_since: float | None = None
        try:
            async for msg in call:
                snap = load.from_pb(msg.report)
                if snap is not None:
                    self._on_report(worker_id, snap)
                if worker_id in self._streams:
                    idle_since = None
                elif idle_since is None:
                    idle_since = loop.time()
                elif loop.time() - idle_since >= self._linger_s:
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported.add(worker_id)  # an older worker: trailers only
            elif exc.code() != grpc.StatusCode.CANCELLED:
                log.debug("load watch on %s ended: %s", worker_id, exc.code().name)
        finally:
            call.cancel()
            self._tasks.pop(worker_id, None)

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
