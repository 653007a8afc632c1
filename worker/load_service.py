"""LoadReporting: a worker's load as a stream, for gateways with long calls here
(a call's trailer reports load only when the call ends)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from meshserve import load
from meshserve.edge import Call, Edge, generic_handler
from meshserve.grpc_server import LOAD_SERVICE
from meshserve.v1 import load_pb2
from worker.host import ModelHost

HEARTBEAT_EVERY = 5  # intervals without change before an unchanged report is resent


class LoadReportingServicer:
    def __init__(self, host: ModelHost) -> None:
        self._host = host

    def handler(self, edge: Edge) -> grpc.GenericRpcHandler:
        return generic_handler(
            LOAD_SERVICE,
            {
                "WatchLoad": edge.stream(
                    "WatchLoad",
                    self.watch_load,
                    decode=load_pb2.WatchLoadRequest.FromString,
                    response_serializer=load_pb2.WatchLoadResponse.SerializeToString,
                )
            },
        )

    async def watch_load(
        self, request: load_pb2.WatchLoadRequest, call: Call
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
