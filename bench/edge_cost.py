"""What one layer at a server's edge costs per call, in instructions (callgrind): a
grpc.aio interceptor that wraps the handler per call (the least an interceptor must do
to map errors), the same mapping as a wrapper applied once when the handler is built,
meshserve's own Edge (request context, one metadata pass, errors -> status with
details), and OpenTelemetry's grpc server interceptor (1% sampling, no exporter).

Each arm is an echo server (unary, bytes in and out) in a process of its own under
callgrind; this process sends each the same calls. Numbers: instructions per call, and
the difference to the bare server.

    python -m bench.edge_cost            # 2,000 calls per arm
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import callgrind
from bench.procs import local_address, repo_env
from bench.report import ROOT, Target, finish, machine, results_path
from meshserve.edge import Call, Edge
from meshserve.launch import launch, module_argv

METHOD = "/bench.Echo/Echo"
ARMS = ("bare", "interceptor", "wrapper", "edge", "otel_interceptor")


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _echo_call(request: bytes, call: Call) -> bytes:
    return request


class _WrapInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        inner = handler.unary_unary

        async def behavior(request: bytes, context: Any) -> bytes:
            try:
                return await inner(request, context)  # type: ignore[no-any-return]
            except ValueError:
                await context.abort(grpc.StatusCode.INTERNAL, "x")
                raise

        return grpc.unary_unary_rpc_method_handler(behavior)


def _wrapped(fn: Callable[[bytes, Any], Awaitable[bytes]]) -> Callable[..., Awaitable[bytes]]:
    async def behavior(request: bytes, context: Any) -> bytes:
        try:
            return await fn(request, context)
        except ValueError:
            await context.abort(grpc.StatusCode.INTERNAL, "x")
            raise

    return behavior


async def serve(mode: str, address: str) -> None:
    interceptors: list[Any] = []
    handler = grpc.unary_unary_rpc_method_handler(_echo)
    if mode == "interceptor":
        interceptors.append(_WrapInterceptor())
    elif mode == "wrapper":
        handler = grpc.unary_unary_rpc_method_handler(_wrapped(_echo))
    elif mode == "edge":
        handler = Edge().unary("Echo", _echo_call)
    elif mode == "otel_interceptor":
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        trace.set_tracer_provider(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01))))
        interceptors.append(aio_server_interceptor())  # type: ignore[no-untyped-call]
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})]
    )
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


@dataclass(frozen=True)
class Config:
    calls: int = 2000
    warmup: int = 200
    concurrency: int = 8


async def _calls(address: str, n: int, concurrency: int) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        echo = ch.unary_unary(METHOD)

        async def caller() -> None:
            for _ in range(n // concurrency):
                await echo(b"x" * 64, timeout=60)

        await asyncio.gather(*(caller() for _ in range(concurrency)))


async def _probe(channel: grpc.aio.Channel) -> object:
    return await channel.unary_unary(METHOD)(b"x", timeout=5)


async def measure(cfg: Config) -> dict[str, float]:
    from meshserve.launch import wait_until_serving

    log_dir = Path(tempfile.mkdtemp(prefix="meshserve-bench-edge-"))
    per: dict[str, float] = {}
    for arm in ARMS:
        address, out = local_address(), log_dir / f"callgrind.{arm}.out"
        command = callgrind.argv(out, module_argv("bench.edge_cost", "--serve", arm, address))
        child = launch(arm, command, log_dir / f"{arm}.log", address=address, env=repo_env(),
                       cwd=ROOT)  # fmt: skip
        try:
            await wait_until_serving(child, _probe, timeout_s=120)
            await _calls(address, cfg.warmup, cfg.concurrency)
            counted = await callgrind.count(
                child, out, functools.partial(_calls, address, cfg.calls, cfg.concurrency)
            )
        finally:
            await child.stop(30)
        per[arm] = counted.per(cfg.calls)
        print(f"  {arm:17s} {per[arm]:10,.0f} instructions per call", flush=True)
    return per


def analyze(per: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each arm's instructions per call, its ratio and its difference to `bare`."""
    bare = per["bare"]
    return {a: {"per_call": v, "ratio": v / bare, "added": v - bare} for a, v in per.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.edge_cost", description=__doc__)
    ap.add_argument("--calls", type=int, default=Config.calls)
    ap.add_argument("--serve", nargs=2, metavar=("ARM", "ADDRESS"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    import uvloop

    if a.serve:
        uvloop.run(serve(*a.serve))
        return
    if not callgrind.available():
        sys.exit("needs valgrind (Debian package valgrind)")
    cfg = Config(calls=a.calls)
    rows = analyze(asyncio.run(measure(cfg)))
    for arm, r in rows.items():
        print(f"  {arm:17s} {r['per_call']:10,.0f}  {r['ratio']:.3f}x  {r['added']:+9,.0f}")
    wrapper, interceptor = rows["wrapper"]["added"], rows["interceptor"]["added"]
    targets = [Target("error mapping: wrapper / interceptor, added instructions",
                      wrapper / interceptor, 1.0, "x", False)]  # fmt: skip
    doc = {"benchmark": "edge_cost", "config": asdict(cfg), "machine": machine(),
           "arms": rows}  # fmt: skip
    finish(doc, targets, results_path(a.out, "edge_cost"))


if __name__ == "__main__":
    main()
