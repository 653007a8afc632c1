"""Transport to workers over gRPC: one long-lived channel per worker, payloads kept as
bytes, grpc errors translated to MeshErrors where they enter (gateway.transport)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from gateway.transport import Metadata, Method, Trailers
from meshserve.errors import MeshError
from meshserve.grpc_server import new_channel
from meshserve.status import from_rpc_error
from registry.records import WorkerRecord

log = logging.getLogger(__name__)

GENERATE = "/meshserve.v1.Inference/Generate"
INFER = "/meshserve.v1.Inference/Infer"

ChannelFactory = Callable[[str], grpc.aio.Channel]


class _Conn:
    __slots__ = ("address", "channel", "generate", "infer")

    def __init__(self, address: str, open_channel: ChannelFactory) -> None:
        self.address = address
        self.channel = open_channel(address)
        # No (de)serializers: the gateway relays the client's bytes unchanged.
        self.generate = self.channel.unary_stream(GENERATE)
        self.infer = self.channel.unary_unary(INFER)


class _StreamCall:
    """A Generate call: messages until EOF."""

    __slots__ = ("_call", "worker_id")

    def __init__(self, call: grpc.aio.UnaryStreamCall, worker_id: str) -> None:
        self._call = call
        self.worker_id = worker_id

    async def read(self) -> bytes | None:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc, self.worker_id) from exc
        return None if msg is grpc.aio.EOF else msg

    def raw_read(self) -> Awaitable[object]:
        read: Awaitable[object] = self._call.read()
        return read

    @property
    def end(self) -> object:
        return grpc.aio.EOF

    def translate(self, exc: Exception) -> MeshError | None:
        return _mapped(exc, self.worker_id) if isinstance(exc, grpc.aio.AioRpcError) else None

    def trailers(self) -> Awaitable[Trailers]:
        trailers: Awaitable[Trailers] = self._call.trailing_metadata()  # no coroutine of ours
        return trailers

    def cancel(self) -> None:
        self._call.cancel()


class _UnaryCall:
    """An Infer call: one message, then the end."""

    __slots__ = ("_call", "_read", "worker_id")

    def __init__(self, call: grpc.aio.UnaryUnaryCall, worker_id: str) -> None:
        self._call = call
        self._read = False
        self.worker_id = worker_id

    async def read(self) -> bytes | None:
        if self._read:
            return None
        self._read = True
        try:
            return await self._call  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc, self.worker_id) from exc

    def raw_read(self) -> Awaitable[object]:
        return self.read()

    @property
    def end(self) -> object:
        return None

    def translate(self, exc: Exception) -> MeshError | None:
        return _mapped(exc, self.worker_id) if isinstance(exc, grpc.aio.AioRpcError) else None

    def trailers(self) -> Awaitable[Trailers]:
        trailers: Awaitable[Trailers] = self._call.trailing_metadata()
        return trailers

    def cancel(self) -> None:
        self._call.cancel()


def _mapped(exc: grpc.aio.AioRpcError, worker_id: str) -> MeshError:
    return from_rpc_error(exc, peer=worker_id)


class Forwarder:
    """Metadata goes to grpc.aio as a `grpc.aio.Metadata`: given a tuple, grpc.aio
    converts it after an isinstance check against `typing.Sequence`, which alone
    costs more than building the Metadata (~0.6 us more per call)."""

    def __init__(self, *, open_channel: ChannelFactory = new_channel) -> None:
        self._open = open_channel
        self._conns: dict[str, _Conn] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _conn(self, worker_id: str, address: str) -> _Conn:
        conn = self._conns.get(worker_id)
        if conn is None or conn.address != address:
            if conn is not None:
                self._close_later(conn)
            conn = self._conns[worker_id] = _Conn(address, self._open)
        return conn

    def channel(self, worker_id: str, address: str) -> grpc.aio.Channel:
        return self._conn(worker_id, address).channel

    def call(
        self,
        method: Method,
        worker: WorkerRecord,
        payload: bytes,
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> _StreamCall | _UnaryCall:
        conn = self._conn(worker.worker_id, worker.address)
        md = grpc.aio.Metadata(*metadata)
        if method is Method.GENERATE:
            return _StreamCall(
                conn.generate(payload, timeout=timeout, metadata=md), worker.worker_id
            )
        return _UnaryCall(conn.infer(payload, timeout=timeout, metadata=md), worker.worker_id)

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
