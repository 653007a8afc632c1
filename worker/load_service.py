"""LoadReporting: a worker's load as a stream, for gateways with long calls here
(a call's trailer reports load only when the call ends)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from meshserve import load
from meshserve.v1 import load_pb2, load_pb2_grpc
from worker.host import ModelHost

HEARTBEAT_EVERY = 5  # intervals without change before an unchanged report is resent


class LoadReportingServicer(load_pb2_grpc.LoadReportingServicer):
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    async def WatchLoad(
        self, request: load_pb2.WatchLoadRequest, context: Any
    ) -> AsyncIterator[load_pb2.WatchLoadResponse]:
        interval = min(max(request.interval_ms or 100, 20), 10_000) / 1000
        last: tuple[int, int, int, float] | None = None
        quiet = 0
        while True:
            snap = self._host.load_snapshot()
            key = (snap.inflight, snap.running, snap.queue_depth, round(snap.kv_cache_use, 3))
            if key != last or quiet >= HEARTBEAT_EVERY:
                yield load_pb2.WatchLoadResponse(report=load.to_pb(snap))
                last, quiet = key, 0
            else:
                quiet += 1
            await asyncio.sleep(interval)  # a sampling period, not a wait for an event
