"""Benchmark meshes: etcd, workers, gateways and the bare proxy as processes on
127.0.0.1, started with meshserve.launch and stopped together (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.cpu import Pinning, pin_threads
from bench.loadgen import LoadGen
from bench.report import ROOT
from meshserve.etcd_process import EtcdProcess, free_port
from meshserve.launch import Child, launch, meshserve_argv, module_argv, wait_until_serving

HOST = "127.0.0.1"
Probe = Callable[[grpc.aio.Channel], Awaitable[object]]


def repo_env() -> dict[str, str]:
    """Children run `python -m bench...` from anywhere: the repository on their path."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path}


def local_address() -> str:
    return f"{HOST}:{free_port(HOST)}"


def fake_args(models: Sequence[str], options: Mapping[str, str], capacity: int) -> list[str]:
    """`meshserve worker` arguments for FakeBackend models (MODEL or MODEL:infer)."""
    args = ["--capacity", str(capacity)]
    for m in models:
        args += ["--fake", m]
    for key, value in options.items():
        args += ["--fake-option", f"{key}={value}"]
    return args


@dataclass
class Mesh:
    """The processes of one benchmark, stopped together."""

    log_dir: Path
    etcd: EtcdProcess | None = None
    procs: list[Child] = field(default_factory=list)

    async def start_etcd(self, cpus: set[int] | None = None) -> str:
        self.etcd = EtcdProcess(self.log_dir / "etcd-data", log_path=self.log_dir / "etcd.log")
        await self.etcd.start()
        if cpus is not None and self.etcd.pid is not None:
            pin_threads(self.etcd.pid, cpus)  # all of Go's threads exist once it serves
        return self.etcd.endpoint

    def launch(
        self,
        name: str,
        argv: Sequence[str],
        *,
        address: str = "",
        cpus: set[int] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Child:
        log = self.log_dir / f"{name}.log"
        full_env = {**repo_env(), **(env or {})}
        child = launch(name, argv, log, address=address, cpus=cpus, cwd=cwd, env=full_env)
        self.procs.append(child)
        return child

    def worker(
        self,
        etcd: str,
        args: Sequence[str],
        *,
        worker_id: str = "bench-worker",
        name: str = "worker",
        cpus: set[int] | None = None,
        log_level: str = "warning",
    ) -> Child:
        address = local_address()
        argv = meshserve_argv("--log-level", log_level, "worker", "--listen", address)
        argv += ["--etcd", etcd, "--worker-id", worker_id, *args]
        return self.launch(name, argv, address=address, cpus=cpus)

    def gateway(
        self,
        etcd: str,
        args: Sequence[str] = (),
        *,
        name: str = "gateway",
        cpus: set[int] | None = None,
        env: Mapping[str, str] | None = None,
        tree: Path | None = None,
    ) -> Child:
        """A gateway; with `tree`, the one of another checkout of meshserve (an earlier
        commit, measured beside this one in the same run)."""
        address = local_address()
        argv = meshserve_argv("--log-level", "warning", "gateway", "--listen", address)
        argv += ["--etcd", etcd, *args]
        if tree is None:
            return self.launch(name, argv, address=address, cpus=cpus, env=env)
        env = {**(env or {}), "PYTHONPATH": str(tree)}
        return self.launch(name, argv, address=address, cpus=cpus, env=env, cwd=tree)

    def proxy(self, upstream: str, *, cpus: set[int] | None = None) -> Child:
        address = local_address()
        argv = module_argv("bench.proxy", "--listen", address, "--upstream", upstream)
        return self.launch("proxy", argv, address=address, cpus=cpus)

    async def start_worker_and_hops(
        self,
        etcd: str,
        pin: Pinning,
        *,
        models: Sequence[str],
        options: Mapping[str, str],
        capacity: int,
        probe: Probe,
        gateway_args: Sequence[str] = (),
    ) -> tuple[Child, Child, Child]:
        """One FakeBackend worker, the gateway and the bare proxy in front of it, each
        serving (probed with a real call) before this returns."""
        worker = self.worker(etcd, fake_args(models, options, capacity), cpus=pin.worker)
        gateway = self.gateway(etcd, gateway_args, cpus=pin.hop)
        proxy = self.proxy(worker.address, cpus=pin.hop)
        for p in (worker, gateway, proxy):
            await wait_until_serving(p, probe)
        return worker, gateway, proxy

    def check_alive(self) -> None:
        for p in self.procs:
            p.check_alive()

    def kill_now(self) -> None:
        """SIGKILL everything, without waiting (a watchdog's last resort)."""
        for p in self.procs:
            p.kill()
        if self.etcd is not None:
            self.etcd.kill()

    async def close(self) -> None:
        # Hops first, worker last, so nothing logs errors about a vanished upstream.
        for p in reversed(self.procs):
            await p.stop()
        if self.etcd is not None:
            await self.etcd.stop()


@dataclass
class Rig:
    """A hop benchmark's processes: by arm name, the one each arm's calls go to (direct:
    the worker, gateway, proxy), with the mesh and the load generator."""

    mesh: Mesh
    loadgen: LoadGen
    procs: dict[str, Child]


@contextlib.asynccontextmanager
async def hop_rig(
    prefix: str,
    pin: Pinning,
    *,
    models: Sequence[str],
    options: Mapping[str, str],
    capacity: int,
    probe: Probe,
    gateway_args: Sequence[str] = (),
) -> AsyncIterator[Rig]:
    """etcd, one FakeBackend worker, the gateway and the bare proxy, all serving, and a
    load generator; everything stopped on the way out."""
    mesh = Mesh(Path(tempfile.mkdtemp(prefix=prefix)))
    loadgen = LoadGen(pin.client)
    try:
        etcd = await mesh.start_etcd(pin.etcd)
        worker, gateway, proxy = await mesh.start_worker_and_hops(
            etcd,
            pin,
            models=models,
            options=options,
            capacity=capacity,
            probe=probe,
            gateway_args=gateway_args,
        )
        yield Rig(mesh, loadgen, {"direct": worker, "gateway": gateway, "proxy": proxy})
    finally:
        loadgen.close()
        await mesh.close()
