"""Benchmark plumbing: mesh processes (etcd, worker, gateway, bare proxy), their CPU time
from /proc, CPU pinning, and a load generator that runs in a process of its own.

Everything listens on 127.0.0.1. Every process is stopped on exit (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from meshserve.etcd_process import EtcdProcess, free_port
from meshserve.grpc_server import CHANNEL_OPTIONS

HOST = "127.0.0.1"
_TICK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent

# -- CPU time ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / _TICK  # fields 14 and 15 of proc(5)


def cpu_snapshot(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


async def cpu_at_edges(
    pids: Iterable[int], edges: Sequence[float], marks: list[tuple[float, dict[int, float]]]
) -> None:
    """Append (time, CPU seconds per pid) at each of `edges` (perf_counter times): the
    measurement window's start and end, read while the load runs."""
    for edge in edges:
        await asyncio.sleep(max(0.0, edge - time.perf_counter()))
        marks.append((time.perf_counter(), cpu_snapshot(pids)))


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Pin every existing thread of `pid` (sched_setaffinity applies per thread; threads
    created later inherit from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each role runs on; None = wherever the kernel likes."""

    hop: set[int] | None = None  # gateway and proxy
    worker: set[int] | None = None
    client: set[int] | None = None
    etcd: set[int] | None = None

    def describe(self) -> str:
        if self.hop is None and self.worker is None and self.client is None:
            return "none (all processes float over all CPUs)"
        parts = [
            f"{role}={sorted(cpus)}"
            for role, cpus in (
                ("hop", self.hop),
                ("worker", self.worker),
                ("client", self.client),
                ("etcd", self.etcd),
            )
            if cpus is not None
        ]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, list[int] | None]:
        return {
            "hop": sorted(self.hop) if self.hop is not None else None,
            "worker": sorted(self.worker) if self.worker is not None else None,
            "client": sorted(self.client) if self.client is not None else None,
            "etcd": sorted(self.etcd) if self.etcd is not None else None,
        }


def pinning(mode: str) -> Pinning:
    """`none`; or `split`: the hop on the last CPU, worker and etcd on the first, the
    client with the hop (so the direct arm's client gets the CPU the hop would use)."""
    cpus = available_cpus()
    if mode == "none" or len(cpus) < 2:
        return Pinning()
    if mode == "split":
        first, last = {cpus[0]}, {cpus[-1]}
        return Pinning(hop=last, worker=first, client=last, etcd=first)
    raise ValueError(f"unknown pinning {mode!r}: none or split")


# -- processes -----------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}; log tail:\n{self.log_tail()}"
            )

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"

    def stop(self, grace_s: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5.0)


def spawn(
    name: str, argv: Sequence[str], address: str, log_dir: Path, cpus: set[int] | None
) -> Proc:
    log_path = log_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))

    if cpus is not None:  # taskset execs the command: same pid, every thread pinned
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    return Proc(name, popen, address, log_path)


def start_worker(
    etcd: str,
    log_dir: Path,
    *,
    models: Sequence[str],
    options: dict[str, str],
    capacity: int,
    cpus: set[int] | None = None,
    worker_id: str = "bench-worker",
) -> Proc:
    """`meshserve worker` with FakeBackend models (MODEL or MODEL:infer)."""
    address = f"{HOST}:{free_port(HOST)}"
    argv = [sys.executable, "-m", "meshserve", "--log-level", "warning", "worker"]
    argv += ["--listen", address, "--etcd", etcd, "--worker-id", worker_id]
    argv += ["--capacity", str(capacity)]
    for m in models:
        argv += ["--fake", m]
    for key, value in options.items():
        argv += ["--fake-option", f"{key}={value}"]
    return spawn("worker", argv, address, log_dir, cpus)


def start_gateway(etcd: str, log_dir: Path, *, cpus: set[int] | None = None) -> Proc:
    address = f"{HOST}:{free_port(HOST)}"
    argv = [sys.executable, "-m", "meshserve", "--log-level", "warning", "gateway"]
    argv += ["--listen", address, "--etcd", etcd]
    return spawn("gateway", argv, address, log_dir, cpus)


def start_proxy(upstream: str, log_dir: Path, *, cpus: set[int] | None = None) -> Proc:
    address = f"{HOST}:{free_port(HOST)}"
    argv = [sys.executable, "-m", "bench.proxy", "--listen", address, "--upstream", upstream]
    return spawn("proxy", argv, address, log_dir, cpus)


async def wait_until_serving(
    proc: Proc, probe: Callable[[grpc.aio.Channel], Awaitable[object]], timeout_s: float = 60.0
) -> None:
    """Retry `probe` (a real call) until it succeeds: the process is up and, for a
    gateway, its registry view has the worker."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(proc.address, options=CHANNEL_OPTIONS) as channel:
        last: BaseException | None = None
        while time.monotonic() < deadline:
            proc.check_alive()
            try:
                await asyncio.wait_for(probe(channel), 5.0)
                return
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                last = exc
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} at {proc.address} not serving after {timeout_s}s: {last}")


@dataclass
class Mesh:
    """The processes of one benchmark, stopped together."""

    log_dir: Path
    etcd: EtcdProcess | None = None
    procs: list[Proc] = field(default_factory=list)

    async def start_etcd(self, cpus: set[int] | None) -> str:
        self.etcd = EtcdProcess(self.log_dir / "etcd-data", log_path=self.log_dir / "etcd.log")
        await self.etcd.start()
        if cpus is not None and self.etcd.pid is not None:
            pin_threads(self.etcd.pid, cpus)
        return self.etcd.endpoint

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    async def start_worker_and_hops(
        self,
        etcd: str,
        pin: Pinning,
        *,
        models: Sequence[str],
        options: dict[str, str],
        capacity: int,
        probe: Callable[[grpc.aio.Channel], Awaitable[object]],
    ) -> tuple[Proc, Proc, Proc]:
        """One FakeBackend worker, the gateway and the bare proxy in front of it, each
        serving (probed with a real call) before this returns."""
        worker = self.add(
            start_worker(
                etcd, self.log_dir, models=models, options=options, capacity=capacity,
                cpus=pin.worker,
            )
        )  # fmt: skip
        gateway = self.add(start_gateway(etcd, self.log_dir, cpus=pin.hop))
        proxy = self.add(start_proxy(worker.address, self.log_dir, cpus=pin.hop))
        for p in (worker, gateway, proxy):
            await wait_until_serving(p, probe)
        return worker, gateway, proxy

    def check_alive(self) -> None:
        for p in self.procs:
            p.check_alive()

    async def close(self) -> None:
        # Hops first, worker last, so nothing logs errors about a vanished upstream.
        for p in reversed(self.procs):
            p.stop()
        if self.etcd is not None:
            await self.etcd.stop()


# -- load generator process -------------------------------------------------------------

JobFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _loadgen_main(conn: Connection, cpus: list[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, set(cpus))
    import uvloop

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg is None:
                return
            target, job = msg
            module, _, fn_name = target.partition(":")
            fn: JobFn = getattr(importlib.import_module(module), fn_name)
            try:
                result = await fn(job)
                conn.send(("ok", result))
            except Exception as exc:  # reported to the parent, which raises it
                conn.send(("error", f"{type(exc).__name__}: {exc}"))

    uvloop.run(serve())


class LoadGen:
    """A client process (grpc.aio on uvloop) that runs jobs `module:function(dict)`.

    One long-lived process: its interpreter, imports and loop are warm between phases,
    and it never shares a GIL or a loop with the processes it measures."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_loadgen_main,
            args=(child, sorted(cpus) if cpus is not None else None),
            name="bench-loadgen",
            daemon=True,
        )
        self._proc.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    async def run(self, target: str, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._conn.send((target, job))
        ready = await loop.run_in_executor(None, self._conn.poll, timeout_s)
        if not ready:
            raise TimeoutError(f"load generator job {target} took over {timeout_s:.0f}s")
        status, payload = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"load generator job {target} failed: {payload}")
        result: dict[str, Any] = payload
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(None)
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- statistics and reporting -------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (q in 0..100); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    limit: float
    unit: str
    higher_is_better: bool

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def row(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "PASS" if self.passed else "MISS"
        value = f"{self.value:>10.3f} {op} {self.limit:<8g}"
        return f"  {self.name:<46} {value} {self.unit:<9} {verdict}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "pass": self.passed,
        }


def print_targets(targets: Sequence[Target]) -> None:
    print(f"  {'target':<46} {'value':>10}    {'limit':<8} {'unit':<9} result")
    for t in targets:
        print(t.row())


def finish_report(
    result: dict[str, Any], targets: Sequence[Target], out: Path | None, name: str, quick: bool
) -> None:
    """Print the machine's load and the targets, then write the JSON result."""
    load = result["machine"]
    print(
        f"  load average (1/5/15 min) at start {load['loadavg_at_start']}, at end "
        f"{load['loadavg_at_end']} on {len(load['cpus'])} shared CPUs"
    )
    print_targets(targets)
    path = out or results_dir() / (f"{name}.quick.json" if quick else f"{name}.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def results_dir() -> Path:
    path = ROOT / "bench" / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine(loadavg_at_start: tuple[float, float, float]) -> dict[str, Any]:
    """What the numbers were measured on, with the load average around the run (the
    machine is shared: other work running meanwhile shows up here)."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": available_cpus(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "loadavg_at_start": loadavg_at_start,
        "loadavg_at_end": os.getloadavg(),
    }
