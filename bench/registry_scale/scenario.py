"""The orchestrator: starts the children, runs the phases, collects raw records.

Phases: hosts register all workers -> gateways cold-start one after another (list +
watch with every worker present) -> probe rounds (one worker registers or deregisters
every `probe_interval_s`) -> SIGKILL the hosts of half the workers -> hold -> finals.
The parent only decides when to move on; every timestamp comes from the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cpu import cpu_seconds_or_none
from bench.procs import repo_env
from bench.registry_scale.analyze import GatewayLog, Msg, Raw, analyze, round_p99
from bench.registry_scale.config import MASS_FAILURE_SLACK_S, Config
from bench.registry_scale.gauges import etcd_histograms, stall_meter
from bench.report import ROOT
from meshserve.launch import Child, launch, module_argv

Say = Callable[[str], None]


class ChildFailed(RuntimeError):
    pass


class RoleProc:
    """A `python -m bench.registry_scale.children ROLE ...` process and its messages:
    change events and probe ops are collected as they come, the rest is expected."""

    def __init__(self, child: Child, reader: asyncio.StreamReader, pipe: asyncio.BaseTransport):
        self.child = child
        self.name = child.name
        self.log = GatewayLog()
        self.ops: list[Msg] = []
        self._pipe = pipe
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(reader), name=f"bench-read-{self.name}")

    @classmethod
    async def start(cls, name: str, workdir: Path, role: str, *args: object) -> RoleProc:
        argv = module_argv("bench.registry_scale.children", role, *map(str, args))
        child = launch(name, argv, workdir / f"{name}.stderr", cwd=ROOT, env=repo_env(),
                       pipes=True)  # fmt: skip
        reader = asyncio.StreamReader(limit=2**24)
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), child.stdout
        )
        return cls(child, reader, pipe)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            async for line in reader:
                msg = json.loads(line)
                if msg["msg"] == "ev":
                    self.log.apply(msg)
                elif msg["msg"] == "op":
                    self.ops.append(msg)
                else:
                    self._queue.put_nowait(msg)
        finally:
            self._queue.put_nowait({"msg": "eof"})

    def send(self, *words: object) -> None:
        if self.child.running:
            with contextlib.suppress(BrokenPipeError):
                self.child.stdin.write((" ".join(map(str, words)) + "\n").encode())
                self.child.stdin.flush()

    async def expect(self, kind: str, timeout: float) -> Msg:
        try:
            msg = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise ChildFailed(
                f"{self.name}: no {kind!r} within {timeout:g}s{self._tail()}"
            ) from None
        if msg["msg"] == kind:
            return msg
        if msg["msg"] == "eof":
            code = await self.child.wait(5)
            raise ChildFailed(f"{self.name} exited (rc={code}) before {kind!r}{self._tail()}")
        raise ChildFailed(f"{self.name}: expected {kind!r}, got {msg}")

    def _tail(self) -> str:
        return "; stderr:\n" + self.child.log_tail()

    async def close(self, grace_s: float = 5.0) -> None:
        self.send("exit")
        if await self.child.wait(grace_s) is None:
            self.child.kill()
            await self.child.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._pipe.close()
        with contextlib.suppress(BrokenPipeError):
            self.child.stdin.close()


@dataclass
class Cast:
    hosts: list[RoleProc]
    gateways: list[RoleProc]
    probe: RoleProc


async def _until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `cond`; only decides when to move on (timestamps come from the children)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def start_cast(
    cfg: Config, endpoint: str, workdir: Path, started: list[RoleProc], say: Say
) -> tuple[Cast, list[Msg], float]:
    """Every child, importing in parallel; the hosts register, the gateways wait."""

    async def spawn(name: str, role: str, *args: object) -> RoleProc:
        started.append(await RoleProc.start(name, workdir, role, *args))
        return started[-1]

    say(f"starting {cfg.hosts} worker hosts ({cfg.workers} workers), "
        f"{cfg.gateways} gateways, 1 probe")  # fmt: skip
    t0 = time.monotonic()
    own = int(cfg.conn_per_worker)
    hosts = [
        await spawn(f"host{h}", "host", endpoint, cfg.ttl, first, count, own)
        for h, (first, count) in enumerate(cfg.host_slices())
    ]
    gateways = [
        await spawn(f"gw{g}", "gateway", endpoint, f"gw{g}", cfg.workers)
        for g in range(cfg.gateways)
    ]
    probe = await spawn("probe", "probe", endpoint, cfg.ttl)
    registered = [await h.expect("registered", 120) for h in hosts]
    register_s = time.monotonic() - t0
    for c in [*gateways, probe]:
        await c.expect("loaded", 60)
    say(f"{cfg.workers} workers registered in {register_s:.1f}s (incl. process start)")
    return Cast(hosts, gateways, probe), registered, register_s


async def cold_start(gateways: list[RoleProc], say: Say) -> list[Msg]:
    """One gateway at a time: each finds all workers present, and the others are
    already watching (as when a gateway is added to a running mesh)."""
    ready = []
    for gw in gateways:
        gw.send("start")
        r = await gw.expect("ready", 60)
        ready.append(r)
        say(f"{gw.name}: list {r['list_ms']:.0f} ms, watch {r['watch_ms']:.0f} ms, "
            f"{r['n_listed']} workers")  # fmt: skip
    return ready


async def probe_rounds(cfg: Config, cast: Cast, say: Say) -> list[list[Msg]]:
    """One registration or deregistration every probe_interval_s; the ops per round."""
    probe, logs = cast.probe, [gw.log for gw in cast.gateways]
    rounds = []
    for rnd in range(cfg.probe_rounds):
        n_ops = len(probe.ops)
        probe.send("round", rnd, cfg.probes, cfg.probe_interval_s)
        await probe.expect("round_done", 60 + 4 * cfg.probes * cfg.probe_interval_s)
        ops = probe.ops[n_ops:]
        dels = [op["id"] for op in ops if op["kind"] == "del"]

        def all_seen(dels: list[str] = dels) -> bool:
            return all(all(w in log.first_del for w in dels) for log in logs)

        await _until(all_seen, 10)
        rounds.append(ops)
        say(f"probe round {rnd}: put p99 {round_p99(ops, logs, 'put'):.1f} ms, "
            f"delete p99 {round_p99(ops, logs, 'del'):.1f} ms")  # fmt: skip
    return rounds


async def mass_failure(cfg: Config, cast: Cast, say: Say) -> tuple[int, bool]:
    """SIGKILL the first half of the hosts (their keep-alives just stop), wait until
    every gateway dropped their workers, then hold: the survivors must stay."""
    doomed = cast.hosts[: cfg.hosts // 2]
    killed = cfg.worker_ids(killed=True)
    t_kill = time.monotonic_ns()
    for h in doomed:
        h.child.kill()
    for h in doomed:
        await h.child.wait()
    say(f"killed {len(doomed)} hosts ({len(killed)} workers); waiting for expiry")
    all_gone = await _until(
        lambda: not any(gw.log.current & killed for gw in cast.gateways),
        cfg.ttl + MASS_FAILURE_SLACK_S + 10,  # past the target, to report how far off
    )
    await asyncio.sleep(cfg.hold)
    return t_kill, all_gone


async def finals(procs: list[RoleProc]) -> dict[str, Msg]:
    out = {}
    for p in procs:
        p.send("final")
        out[p.name] = await p.expect("final", 30)
    return out


async def measure(
    cfg: Config, endpoint: str, workdir: Path, *, etcd_pid: int | None, say: Say
) -> Raw:
    started: list[RoleProc] = []
    stalls: list[float] = []
    meter = asyncio.create_task(stall_meter(stalls), name="bench-stall-meter")
    try:
        cast, registered, register_s = await start_cast(cfg, endpoint, workdir, started, say)
        cpu0 = cpu_seconds_or_none(etcd_pid) if etcd_pid else None
        t0 = time.monotonic()
        ready = await cold_start(cast.gateways, say)
        disk0 = await etcd_histograms(endpoint)
        rounds = await probe_rounds(cfg, cast, say)
        disk1 = await etcd_histograms(endpoint)
        t_kill, all_gone = await mass_failure(cfg, cast, say)
        finals_gw = await finals(cast.gateways)
        finals_host = await finals(cast.hosts[cfg.hosts // 2 :])
        steady_s = time.monotonic() - t0
        cpu1 = cpu_seconds_or_none(etcd_pid) if etcd_pid else None
    finally:
        meter.cancel()
        await asyncio.gather(*(c.close() for c in started), return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await meter
    logs = {gw.name: gw.log for gw in cast.gateways}
    etcd_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return Raw(register_s, registered, ready, logs, rounds, (disk0, disk1), t_kill, all_gone,
               finals_gw, finals_host, steady_s, etcd_cpu, stalls)  # fmt: skip


async def run_scenario(
    cfg: Config,
    endpoint: str,
    workdir: Path,
    *,
    etcd_pid: int | None = None,
    say: Say = lambda s: None,
) -> dict[str, Any]:
    """Run every phase against etcd at `endpoint`; return the figures and checks."""
    return analyze(cfg, await measure(cfg, endpoint, workdir, etcd_pid=etcd_pid, say=say))
