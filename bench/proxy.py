"""A bare pass-through proxy for meshserve.v1.Inference: the baseline of a Python hop.

Bytes in, bytes out (no (de)serializers), one channel to one upstream, grpc.aio on
uvloop. No routing, no load accounting, no metadata relay: whatever the gateway costs
beyond this is what its features cost.

    python -m bench.proxy --listen 127.0.0.1:50100 --upstream 127.0.0.1:50200
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from meshserve.grpc_server import CHANNEL_OPTIONS, INFERENCE_SERVICE, SERVER_OPTIONS

# grpc ships no type hints: the servicer context is untyped.
Ctx = Any


class Proxy:
    def __init__(self, upstream: str) -> None:
        self.channel = grpc.aio.insecure_channel(upstream, options=CHANNEL_OPTIONS)
        self._infer = self.channel.unary_unary(f"/{INFERENCE_SERVICE}/Infer")
        self._generate = self.channel.unary_stream(f"/{INFERENCE_SERVICE}/Generate")
        self._list = self.channel.unary_unary(f"/{INFERENCE_SERVICE}/ListModels")

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE,
            {
                "Infer": grpc.unary_unary_rpc_method_handler(self.infer),
                "Generate": grpc.unary_stream_rpc_method_handler(self.generate),
                "ListModels": grpc.unary_unary_rpc_method_handler(self.list_models),
            },
        )

    async def infer(self, payload: bytes, context: Ctx) -> bytes:
        try:
            resp: bytes = await self._infer(payload, timeout=context.time_remaining())
            return resp
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise

    async def list_models(self, payload: bytes, context: Ctx) -> bytes:
        try:
            resp: bytes = await self._list(payload, timeout=context.time_remaining())
            return resp
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise

    async def generate(self, payload: bytes, context: Ctx) -> AsyncIterator[bytes]:
        call = self._generate(payload, timeout=context.time_remaining())
        try:
            async for msg in call:
                yield msg
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            call.cancel()  # no-op when finished; stops upstream work when our client left


async def serve(listen: str, upstream: str) -> None:
    proxy = Proxy(upstream)
    server = grpc.aio.server(handlers=[proxy.handler()], options=SERVER_OPTIONS)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)
        await proxy.channel.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__)
    p.add_argument("--listen", required=True, help="host:port to serve on")
    p.add_argument("--upstream", required=True, help="host:port of the worker")
    args = p.parse_args()
    import uvloop

    uvloop.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
