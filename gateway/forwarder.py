"""Transport to workers: one long-lived channel per worker, payloads kept as bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from meshserve.grpc_server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

GENERATE = "/meshserve.v1.Inference/Generate"
INFER = "/meshserve.v1.Inference/Infer"


class _Conn:
    __slots__ = ("address", "channel", "generate", "infer")

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        # No (de)serializers: the gateway relays the client's bytes unchanged.
        self.generate = self.channel.unary_stream(GENERATE)
        self.infer = self.channel.unary_unary(INFER)


class Forwarder:
    """Metadata goes to grpc.aio as a `grpc.aio.Metadata`: given a tuple, grpc.aio
    converts it after an isinstance check against `typing.Sequence`, which alone
    costs more than building the Metadata (~0.6 us more per call)."""

    def __init__(self) -> None:
        self._conns: dict[str, _Conn] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _conn(self, worker_id: str, address: str) -> _Conn:
        conn = self._conns.get(worker_id)
        if conn is None or conn.address != address:
            if conn is not None:
                self._close_later(conn)
            conn = self._conns[worker_id] = _Conn(address)
        return conn

    def channel(self, worker_id: str, address: str) -> grpc.aio.Channel:
        return self._conn(worker_id, address).channel

    def generate(
        self,
        worker_id: str,
        address: str,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> grpc.aio.UnaryStreamCall:
        call: grpc.aio.UnaryStreamCall = self._conn(worker_id, address).generate(
            payload, timeout=timeout, metadata=grpc.aio.Metadata(*metadata)
        )
        return call

    def infer(
        self,
        worker_id: str,
        address: str,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: tuple[tuple[str, str], ...],
    ) -> grpc.aio.UnaryUnaryCall:
        call: grpc.aio.UnaryUnaryCall = self._conn(worker_id, address).infer(
            payload, timeout=timeout, metadata=grpc.aio.Metadata(*metadata)
        )
        return call

    def retain(self, worker_ids: set[str]) -> None:
        """Close channels of workers that left the fleet."""
        for wid in list(self._conns):
            if wid not in worker_ids:
                self._close_later(self._conns.pop(wid))

    def _close_later(self, conn: _Conn) -> None:
        # Grace lets calls already on the channel finish.
        task = asyncio.get_running_loop().create_task(conn.channel.close(grace=5.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.channel.close(grace=None)
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
