"""What one layer at a server's edge costs per call: a grpc.aio interceptor, a wrapper
applied once to each handler, and OpenTelemetry's grpc server interceptor.

Each arm is an echo server (unary, bytes in and out) in a process of its own; the load
generator (this process) drives them in turn, closed loop, arms alternating within one
run; the figure is the server's CPU time (utime + stime from /proc) per request, and the
ratio to the bare server. Medians over rounds.

    python -m bench.edge_cost            # 5 rounds x 2 s per arm
    python -m bench.edge_cost --quick    # 3 rounds x 1 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from meshserve.etcd_process import free_port

HOST = "127.0.0.1"
METHOD = "/bench.Echo/Echo"
ARMS = ("bare", "interceptor", "wrapper", "otel_interceptor")
_TICK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


async def _echo(request: bytes, context: Any) -> bytes:
    return request


class _WrapInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """The least an interceptor must do to map errors: wrap the handler per call."""

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
    """The same error mapping, applied once when the handler is built."""

    async def behavior(request: bytes, context: Any) -> bytes:
        try:
            return await fn(request, context)
        except ValueError:
            await context.abort(grpc.StatusCode.INTERNAL, "x")
            raise

    return behavior


async def serve(mode: str, port: int) -> None:
    interceptors: list[Any] = []
    fn: Callable[..., Awaitable[bytes]] = _echo
    if mode == "interceptor":
        interceptors.append(_WrapInterceptor())
    elif mode == "wrapper":
        fn = _wrapped(_echo)
    elif mode == "otel_interceptor":
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # 1% of root calls sampled, no exporter: the interceptor's own cost per call.
        trace.set_tracer_provider(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01))))
        interceptors.append(aio_server_interceptor())  # type: ignore[no-untyped-call]
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(fn)}
            )
        ]
    )
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / _TICK


@dataclass
class Arm:
    name: str
    proc: subprocess.Popen[bytes]
    address: str


async def _wait_up(address: str, timeout_s: float = 20.0) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        await asyncio.wait_for(ch.channel_ready(), timeout_s)


async def closed_loop(address: str, concurrency: int, seconds: float) -> int:
    """Requests completed in `seconds` with `concurrency` calls in flight."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.unary_unary(METHOD)
        payload = b"x" * 64
        done = 0
        end = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await call(payload)
                done += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
        return done


def _spawn(names: tuple[str, ...]) -> list[Arm]:
    arms = []
    for name in names:
        port = free_port(HOST)
        argv = [sys.executable, "-m", "bench.edge_cost", "--serve", name, "--port", str(port)]
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL)
        arms.append(Arm(name, proc, f"{HOST}:{port}"))
    return arms


async def measure(rounds: int, seconds: float, concurrency: int) -> dict[str, list[float]]:
    arms = _spawn(ARMS)
    for arm in arms:
        await _wait_up(arm.address)
    per_req: dict[str, list[float]] = {a.name: [] for a in arms}
    try:
        for arm in arms:  # warm-up
            await closed_loop(arm.address, concurrency, 0.5)
        for r in range(rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            for arm in order:
                before = cpu_seconds(arm.proc.pid)
                n = await closed_loop(arm.address, concurrency, seconds)
                used = cpu_seconds(arm.proc.pid) - before
                per_req[arm.name].append(used / max(n, 1) * 1e6)
                print(f"  round {r} {arm.name:17s} {n / seconds:7.0f} req/s "
                      f"{per_req[arm.name][-1]:6.1f} us CPU/req", flush=True)  # fmt: skip
    finally:
        for arm in arms:
            arm.proc.send_signal(signal.SIGTERM)
        for arm in arms:
            try:
                arm.proc.wait(5)
            except subprocess.TimeoutExpired:
                arm.proc.kill()
                arm.proc.wait(5)
    return per_req


def analyze(per_req: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median CPU per request of each arm, its ratio and its difference to `bare`."""
    bare = statistics.median(per_req["bare"])
    out = {}
    for name, values in per_req.items():
        med = statistics.median(values)
        out[name] = {"us_per_req": med, "ratio": med / bare, "added_us": med - bare}
    return out


async def _amain(args: argparse.Namespace) -> None:
    per_req = await measure(args.rounds, args.seconds, args.concurrency)
    print("server CPU per request, medians over rounds:")
    for name, row in analyze(per_req).items():
        print(f"  {name:17s} {row['us_per_req']:6.1f} us  {row['ratio']:.3f}x  "
              f"{row['added_us']:+6.1f} us")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--serve", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(serve(args.serve, args.port))
        return
    if args.quick:
        args.rounds, args.seconds = 3, 1.0
    uvloop.run(_amain(args))


if __name__ == "__main__":
    main()
