"""meshserve gateways and workers as real processes, for tests across process borders."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshserve.etcd_process import free_port
from meshserve.v1 import inference_pb2, inference_pb2_grpc, types_pb2

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Proc:
    name: str
    proc: asyncio.subprocess.Process
    address: str
    log: Path
    metrics_port: int = 0

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"


@dataclass
class Procs:
    """Started processes, all stopped (SIGTERM, then SIGKILL) when the block ends."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    started: list[Proc] = field(default_factory=list)

    async def spawn(self, name: str, args: Sequence[str], *, metrics: bool = True) -> Proc:
        address = f"127.0.0.1:{free_port()}"
        metrics_port = free_port() if metrics else 0
        argv = [sys.executable, "-m", "meshserve", *args, "--listen", address]
        if metrics:
            argv += ["--metrics-port", str(metrics_port)]
        log = self.log_dir / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with log.open("wb") as fh:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=fh, stderr=fh, cwd=ROOT, env=env
            )
        p = Proc(name, proc, address, log, metrics_port)
        self.started.append(p)
        return p

    async def stop(self) -> None:
        for p in reversed(self.started):
            if p.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.terminate()
        for p in reversed(self.started):
            try:
                await asyncio.wait_for(p.proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.kill()
                await p.proc.wait()


@contextlib.asynccontextmanager
async def processes(log_dir: Path, **env: str) -> AsyncIterator[Procs]:
    procs = Procs(log_dir, dict(env))
    try:
        yield procs
    finally:
        await procs.stop()


async def wait_models(gateway: Proc, models: Sequence[str], timeout_s: float = 60.0) -> None:
    """Until the gateway lists every model in `models` as READY (real calls, retried)."""
    async with asyncio.timeout(timeout_s), grpc.aio.insecure_channel(gateway.address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        while True:
            if gateway.proc.returncode is not None:
                raise RuntimeError(f"{gateway.name} exited:\n{gateway.log_tail()}")
            try:
                resp = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                ready = {m.name for m in resp.models if m.state == types_pb2.MODEL_STATE_READY}
                if set(models) <= ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)  # polling another process: there is no event to await
