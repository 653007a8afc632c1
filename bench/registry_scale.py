"""The etcd registry at scale: 1,000 leased workers, 4 watching gateways, a real etcd.

    python -m bench.registry_scale            # 1,000 workers, 4 gateways, TTL 3 s, 3 runs
    python -m bench.registry_scale --quick    # 100 workers, 1 run
    ... --etcd-no-fsync / --conn-per-worker   # diagnosis: the disk's share / real fan-in

Every simulated worker is its own `EtcdRegistry` (own channel, own lease, own
keep-alive task), exactly as a worker process runs it. They live in `--hosts`
child processes (250 each by default) so that half of them can die at once by
SIGKILL, the most abrupt failure there is. Each gateway is a fresh child process
with its own `EtcdRegistry` + `RegistryView`, so its cold start, RSS and CPU are
its own. Children talk JSON lines over stdout and take commands on stdin;
timestamps are `time.monotonic_ns()`, one CLOCK_MONOTONIC for every process.

Phases: hosts register all workers -> gateways cold-start one after another
(list + watch with every worker present; RSS and tracemalloc) -> probe rounds
(one worker registers or deregisters every `--probe-interval`; latency from the
call to each gateway's listener) -> SIGKILL the hosts of half the workers and
time their disappearance at every gateway -> hold, then check that no gateway
ever deleted a worker that was alive. Each run starts a fresh etcd; the table
shows the median over runs (the max for the eviction count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from meshserve.etcd_process import EtcdProcess, find_binary
from meshserve.vocab import Device, ModelKind, ModelState
from registry import etcd as etcd_module
from registry.etcd import EtcdRegistry
from registry.records import ModelEntry, WorkerRecord, encode
from registry.view import RegistryView

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
CANARY = "canary-"  # a gateway's own probe record, used to time its first watch
PROBE = "probe-"
NS = 1_000_000_000

# The registry's targets; a killed worker must be gone within TTL + MASS_FAILURE_SLACK_S.
TARGET_PROPAGATION_P99_MS = 100.0
TARGET_COLD_START_MS = 1000.0
TARGET_MEMORY_MB_PER_1000 = 20.0
MASS_FAILURE_SLACK_S = 2.0

T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    workers: int = 1000
    gateways: int = 4
    ttl: int = 3
    hosts: int = 4  # worker-host processes; the first half of them is killed
    probe_rounds: int = 3
    probes: int = 50  # registrations, then as many deregistrations, per round
    probe_interval_s: float = 0.05
    hold_s: float | None = None  # observation after the mass failure; None: 2 * ttl
    # gRPC shares one TCP connection among a process's channels to the same target, so
    # by default etcd sees one connection per host; True gives each worker its own.
    conn_per_worker: bool = False

    def __post_init__(self) -> None:
        if self.hosts < 2 or self.hosts % 2:
            raise ValueError("--hosts must be even and >= 2 (half of them are killed)")
        if self.workers < self.hosts:
            raise ValueError("need at least one worker per host")
        if self.gateways < 1 or self.ttl < 1:
            raise ValueError("need >= 1 gateway and ttl >= 1")

    @property
    def hold(self) -> float:
        return 2.0 * self.ttl if self.hold_s is None else self.hold_s

    def host_slices(self) -> list[tuple[int, int]]:
        """(first worker index, count) per host, as even as possible."""
        base, extra = divmod(self.workers, self.hosts)
        slices, first = [], 0
        for h in range(self.hosts):
            count = base + (1 if h < extra else 0)
            slices.append((first, count))
            first += count
        return slices


def worker_id(index: int) -> str:
    return f"w{index:05d}"


def make_record(wid: str, index: int) -> WorkerRecord:
    """A representative record: a GPU worker serving two models, with labels."""
    return WorkerRecord(
        worker_id=wid,
        address=f"10.0.{index // 250}.{index % 250}:50051",
        device=Device("cuda", index % 8, "NVIDIA H100 80GB HBM3", 80 * 2**30),
        models=(
            ModelEntry("llama-3.1-8b-instruct", ModelKind.GENERATE, ModelState.READY,
                       "vllm", max_concurrency=64),
            ModelEntry("all-minilm-l6-v2", ModelKind.INFER, ModelState.READY,
                       "torch", max_concurrency=32),
        ),
        capacity=64,
        version="0.1.0",
        start_time=datetime(2025, 1, 1, tzinfo=UTC),
        labels={"zone": f"zone-{index % 3}", "node": f"node-{index // 8:04d}"},
    )  # fmt: skip


# -- measurement helpers (also used inside the children) -----------------------


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_s() -> float:
    """This process's CPU time, all threads (gRPC's poller threads included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_s(pid: int) -> float | None:
    """Another process's CPU time (utime + stime) from /proc, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): always an observed value."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize_ms(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(max(values), 2) if values else math.nan,
    }


async def _stall_meter(out: list[float], period: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up, in ms: in the orchestrator, the scheduling stalls
    any process on this machine suffers meanwhile; in a host, its event loop's lag."""
    while True:
        start = time.monotonic()
        await asyncio.sleep(period)
        out.append((time.monotonic() - start - period) * 1000)


# -- children -------------------------------------------------------------------


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class _WarningCounter(logging.Handler):
    """Counts WARNING+ records per logger: keep-alive trouble, view disconnects."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.name] = self.counts.get(record.name, 0) + 1


def _child_logging() -> _WarningCounter:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    counter = _WarningCounter()
    logging.getLogger().addHandler(counter)
    return counter


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _next_command(reader: asyncio.StreamReader) -> list[str]:
    """The next command's words; ["exit"] on EOF (the parent went away)."""
    line = await reader.readline()
    return line.decode().split() or ["exit"]


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class WatchedKeepAlive(EtcdRegistry):
    """Times its own keep-alives: with the host's event-loop lag, tells an eviction's
    cause apart (a host that did not get to send vs. an etcd that did not answer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_renewed = 0.0
        self.max_gap = self.max_call = 0.0  # seconds

    async def _keepalive_once(self, lease_id: int) -> int:
        start = time.monotonic()
        try:
            ttl = await super()._keepalive_once(lease_id)
        finally:
            end = time.monotonic()
            self.max_call = max(self.max_call, end - start)
            if self.last_renewed:
                self.max_gap = max(self.max_gap, end - self.last_renewed)
        if ttl > 0:
            self.last_renewed = end
        return ttl


async def host_main(endpoint: str, ttl: int, first: int, count: int, own_conn: bool) -> None:
    """`count` simulated workers, one EtcdRegistry (own channel and lease) each."""
    if own_conn:
        # This process only hosts simulated workers: make each channel open its own
        # connection, as 1,000 separate worker processes would.
        etcd_module._CHANNEL_OPTIONS.append(("grpc.use_local_subchannel_pool", 1))
    counter = _child_logging()
    commands = await _commands()
    lag_ms: list[float] = []
    meter = asyncio.create_task(_stall_meter(lag_ms))
    regs = [WatchedKeepAlive([endpoint], ttl=ttl) for _ in range(count)]
    for reg in regs:
        await reg.connect()
    # Spread the registrations over one keep-alive period (ttl / 3): real workers start
    # at unrelated times, so their keep-alives are not in phase either.
    spread = ttl / 3
    t0 = time.monotonic()

    async def register(i: int, reg: WatchedKeepAlive) -> None:
        await _sleep_until(t0 + spread * i / count)
        await reg.register(make_record(worker_id(first + i), first + i))
        reg.last_renewed = time.monotonic()

    try:
        await asyncio.gather(*(register(i, reg) for i, reg in enumerate(regs)))
        leases = [reg.lease_id for reg in regs]
        _emit({"msg": "registered", "n": count, "seconds": time.monotonic() - t0})
        cpu0 = cpu_s()
        while (cmd := await _next_command(commands))[0] != "exit":
            if cmd[0] == "final":
                _emit({
                    "msg": "final",
                    # A changed lease id means the keep-alive found its lease gone and
                    # re-granted: the worker was evicted at some point.
                    "regrants": sum(r.lease_id != lid for r, lid in zip(regs, leases, strict=True)),
                    "unregistered": sum(not r.registered for r in regs),
                    "max_renewal_gap_s": max(r.max_gap for r in regs),
                    "max_keepalive_call_s": max(r.max_call for r in regs),
                    "max_loop_lag_s": max(lag_ms, default=0.0) / 1000,
                    "warnings": counter.counts,
                    "cpu_s": cpu_s() - cpu0,
                    "rss_kb": rss_kb(),
                })  # fmt: skip
    finally:
        meter.cancel()
        for reg in regs:
            await reg.close()  # no revoke: etcd is about to go anyway


async def gateway_main(endpoint: str, name: str, expect: int) -> None:
    """One gateway's RegistryView; reports every applied change with its timestamp."""
    counter = _child_logging()
    commands = await _commands()
    reg = EtcdRegistry([endpoint])  # the gateway's defaults
    await reg.connect()  # lazy: no I/O until the view lists
    _emit({"msg": "loaded"})
    if (await _next_command(commands))[0] != "start":
        return
    rss0 = rss_kb()
    t0 = time.monotonic_ns()
    view = RegistryView(reg)
    seen: set[str] = set()

    def on_change() -> None:
        # Timestamp first: this is "the moment the view applied it".
        now = time.monotonic_ns()
        keys = view.workers.keys()
        added, removed = keys - seen, seen - keys
        seen.difference_update(removed)
        seen.update(added)
        if added or removed:
            _emit({"msg": "ev", "t": now, "add": sorted(added), "del": sorted(removed)})

    view.add_listener(on_change)
    await view.start()
    try:
        await view.wait_started()
        t_list = time.monotonic_ns()
        n_listed = len(view.workers)
        # wait_started() fires after the list, before the watch exists. A record of our
        # own seen through the view proves the watch is live (an upper bound: it includes
        # our grant + put).
        canary = CANARY + name
        await reg.register(make_record(canary, 0))
        await view.wait_for(lambda w: canary in w, timeout=30)
        t_watch = time.monotonic_ns()
        await reg.deregister()
        await view.wait_for(lambda w: canary not in w and len(w) >= expect, timeout=30)
        rss1 = rss_kb()
        # Python-heap size of one snapshot like the one the view holds (dict + records).
        tracemalloc.start()
        snapshot, _ = await reg.list_workers()
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        n_traced = len(snapshot)
        del snapshot
        _emit({
            "msg": "ready",
            "list_ms": (t_list - t0) / 1e6,
            "watch_ms": (t_watch - t0) / 1e6,
            "n_listed": n_listed,
            "rss_before_kb": rss0,
            "rss_after_kb": rss1,
            "traced_bytes": traced,
            "n_traced": n_traced,
        })  # fmt: skip
        cpu0 = cpu_s()
        while (cmd := await _next_command(commands))[0] != "exit":
            if cmd[0] == "final":
                _emit({
                    "msg": "final",
                    "workers": sorted(view.workers),
                    "connected": view.connected,
                    "warnings": counter.counts,
                    "cpu_s": cpu_s() - cpu0,
                    "rss_kb": rss_kb(),
                })  # fmt: skip
    finally:
        await view.stop()
        await reg.close()


def _emit_op(kind: str, wid: str, t_call: int, t_write: int) -> None:
    t_ack = time.monotonic_ns()
    _emit({"msg": "op", "kind": kind, "id": wid, "t_call": t_call, "t0": t_write, "t1": t_ack})


class TimedRegistry(EtcdRegistry):
    """Notes when the KV.Put / Lease.Revoke that makes the visible change starts:
    register() first grants a lease, which no gateway sees."""

    write_started_ns = 0

    async def _call(self, op: str, fn: Callable[[float], Awaitable[T]]) -> T:
        if op in ("KV.Put", "Lease.Revoke"):
            self.write_started_ns = time.monotonic_ns()
        return await super()._call(op, fn)


async def probe_main(endpoint: str, ttl: int) -> None:
    """Registers/deregisters one worker at a time, reporting when each call started."""
    _child_logging()
    commands = await _commands()
    _emit({"msg": "loaded"})
    while (cmd := await _next_command(commands))[0] != "exit":
        if cmd[0] != "round":
            continue
        rnd, n, interval = int(cmd[1]), int(cmd[2]), float(cmd[3])
        regs = [TimedRegistry([endpoint], ttl=ttl) for _ in range(n)]
        for reg in regs:
            await reg.connect()
            await reg.ping()  # the channel is up: time the registry, not a TCP connect
        try:
            t_next = time.monotonic()
            for i, reg in enumerate(regs):
                await _sleep_until(t_next)
                wid = f"{PROBE}r{rnd}-{i:04d}"
                t0 = time.monotonic_ns()
                await reg.register(make_record(wid, i))
                _emit_op("put", wid, t0, reg.write_started_ns)
                t_next += interval
            for i, reg in enumerate(regs):
                await _sleep_until(t_next)
                wid = f"{PROBE}r{rnd}-{i:04d}"
                t0 = time.monotonic_ns()
                await reg.deregister()
                _emit_op("del", wid, t0, reg.write_started_ns)
                t_next += interval
        finally:
            for reg in regs:
                await reg.close()
        _emit({"msg": "round_done", "round": rnd})


# -- the orchestrator -------------------------------------------------------------


class ChildFailed(RuntimeError):
    pass


@dataclass
class GatewayLog:
    """What one gateway reported, rebuilt from its change events."""

    current: set[str] = field(default_factory=set)
    first_add: dict[str, int] = field(default_factory=dict)
    first_del: dict[str, int] = field(default_factory=dict)
    deletes: list[tuple[str, int]] = field(default_factory=list)

    def apply(self, msg: dict[str, Any]) -> None:
        t = int(msg["t"])
        for wid in msg["add"]:
            self.current.add(wid)
            self.first_add.setdefault(wid, t)
        for wid in msg["del"]:
            self.current.discard(wid)
            self.first_del.setdefault(wid, t)
            self.deletes.append((wid, t))


class Child:
    """A `python -m bench.registry_scale --role ...` process and its message stream."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.stderr_path = stderr_path
        self.gateway = GatewayLog()
        self.ops: list[dict[str, Any]] = []
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(), name=f"bench-read-{name}")

    @classmethod
    async def spawn(cls, name: str, workdir: Path, role: str, *args: str) -> Child:
        stderr_path = workdir / f"{name}.stderr"
        path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.registry_scale", "--role", role, *args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                cwd=REPO_ROOT, env=env, limit=2**24,
            )  # fmt: skip
        return cls(name, proc, stderr_path)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            async for line in self.proc.stdout:
                msg = json.loads(line)
                if msg["msg"] == "ev":
                    self.gateway.apply(msg)
                elif msg["msg"] == "op":
                    self.ops.append(msg)
                else:
                    self._queue.put_nowait(msg)
        finally:
            self._queue.put_nowait({"msg": "eof"})

    def send(self, *words: object) -> None:
        assert self.proc.stdin is not None
        if self.proc.returncode is None:
            self.proc.stdin.write((" ".join(map(str, words)) + "\n").encode())

    async def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            raise ChildFailed(
                f"{self.name}: no {kind!r} within {timeout:g}s{self._tail()}"
            ) from None
        if msg["msg"] != kind:
            if msg["msg"] == "eof":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 5)
                raise ChildFailed(
                    f"{self.name} exited (rc={self.proc.returncode}) before {kind!r}{self._tail()}"
                )
            raise ChildFailed(f"{self.name}: expected {kind!r}, got {msg}")
        return msg

    def _tail(self) -> str:
        try:
            return "; stderr:\n" + self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)

    async def close(self, grace_s: float = 5.0) -> None:
        self.send("exit")
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def _until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `cond`; only decides when to move on (timestamps come from the children)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


async def run_scenario(
    cfg: Config,
    endpoint: str,
    workdir: Path,
    *,
    etcd_pid: int | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run every phase against etcd at `endpoint`; return the raw figures and checks."""
    children: list[Child] = []
    stalls: list[float] = []
    meter = asyncio.create_task(_stall_meter(stalls), name="bench-stall-meter")

    async def spawn(name: str, role: str, *args: object) -> Child:
        child = await Child.spawn(name, workdir, role, *map(str, args))
        children.append(child)
        return child

    try:
        # Everything imports in parallel; the gateways then wait for "start".
        say(f"starting {cfg.hosts} worker hosts ({cfg.workers} workers), "
            f"{cfg.gateways} gateways, 1 probe")  # fmt: skip
        t_reg = time.monotonic()
        hosts = [
            await spawn(
                f"host{h}", "host", endpoint, cfg.ttl, first, count, int(cfg.conn_per_worker)
            )
            for h, (first, count) in enumerate(cfg.host_slices())
        ]
        gateways = [
            await spawn(f"gw{g}", "gateway", endpoint, f"gw{g}", cfg.workers)
            for g in range(cfg.gateways)
        ]
        probe = await spawn("probe", "probe", endpoint, cfg.ttl)
        registered = [await h.expect("registered", 120) for h in hosts]
        register_s = time.monotonic() - t_reg
        for c in [*gateways, probe]:
            await c.expect("loaded", 60)
        say(f"{cfg.workers} workers registered in {register_s:.1f}s (incl. process start)")

        cpu_etcd0 = proc_cpu_s(etcd_pid) if etcd_pid else None
        t_steady0 = time.monotonic()

        # Cold start, one gateway at a time: each finds all workers present, and the
        # others are already watching (as when a gateway is added to a running mesh).
        ready: list[dict[str, Any]] = []
        for gw in gateways:
            gw.send("start")
            r = await gw.expect("ready", 60)
            ready.append(r)
            say(f"{gw.name}: list {r['list_ms']:.0f} ms, watch {r['watch_ms']:.0f} ms, "
                f"{r['n_listed']} workers")  # fmt: skip

        # Propagation: one registration or deregistration every probe_interval_s.
        disk0 = await etcd_histograms(endpoint)
        per_round_p99: dict[str, list[float]] = {"put": [], "del": []}
        for rnd in range(cfg.probe_rounds):
            n_ops = len(probe.ops)
            probe.send("round", rnd, cfg.probes, cfg.probe_interval_s)
            await probe.expect("round_done", 60 + 4 * cfg.probes * cfg.probe_interval_s)
            ops = probe.ops[n_ops:]
            dels = [op["id"] for op in ops if op["kind"] == "del"]
            await _until(
                lambda dels=dels: all(  # type: ignore[misc]
                    all(w in gw.gateway.first_del for w in dels) for gw in gateways
                ),
                10,
            )
            for kind in ("put", "del"):
                lat = _latencies(ops, gateways, kind)
                per_round_p99[kind].append(percentile([max(row) for row in lat], 99))
            say(f"probe round {rnd}: put p99 {per_round_p99['put'][-1]:.1f} ms, "
                f"delete p99 {per_round_p99['del'][-1]:.1f} ms")  # fmt: skip

        disk1 = await etcd_histograms(endpoint)

        # Mass failure: SIGKILL the first half of the hosts; their keep-alives just stop.
        doomed, survivors = hosts[: cfg.hosts // 2], hosts[cfg.hosts // 2 :]
        killed_ids = {
            worker_id(first + i)
            for first, count in cfg.host_slices()[: cfg.hosts // 2]
            for i in range(count)
        }
        t_kill = time.monotonic_ns()
        for h in doomed:
            h.kill()
        for h in doomed:
            await h.proc.wait()
        say(f"killed {len(doomed)} hosts ({len(killed_ids)} workers); waiting for expiry")
        limit_s = cfg.ttl + MASS_FAILURE_SLACK_S
        all_gone = await _until(
            lambda: not any(gw.gateway.current & killed_ids for gw in gateways),
            limit_s + 10,  # keep measuring past the target, to report how far off
        )
        await asyncio.sleep(cfg.hold)  # survivors must stay, at every gateway

        finals_gw = []
        for gw in gateways:
            gw.send("final")
            finals_gw.append(await gw.expect("final", 30))
        finals_host = []
        for h in survivors:
            h.send("final")
            finals_host.append(await h.expect("final", 30))
        steady_s = time.monotonic() - t_steady0
        cpu_etcd1 = proc_cpu_s(etcd_pid) if etcd_pid else None
    finally:
        meter.cancel()
        await asyncio.gather(*(c.close() for c in children), return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await meter

    survivor_ids = {
        worker_id(first + i)
        for first, count in cfg.host_slices()[cfg.hosts // 2 :]
        for i in range(count)
    }
    # Done when no killed worker is left; timed by the last delete after the kill (one
    # already missing at the kill was evicted earlier, which is counted below).
    gone_s: list[float | None] = []
    first_gone_s: list[float | None] = []
    for gw in gateways:
        after = [t for w, t in gw.gateway.deletes if w in killed_ids and t >= t_kill]
        done = not gw.gateway.current & killed_ids
        gone_s.append((max(after, default=t_kill) - t_kill) / NS if done else None)
        first_gone_s.append((min(after) - t_kill) / NS if after else None)

    evictions = _evictions(gateways, probe.ops, killed_ids, t_kill)
    n_probe = cfg.probe_rounds * cfg.probes
    rss_mb = [(r["rss_after_kb"] - r["rss_before_kb"]) / 1024 for r in ready]
    traced_mb = [r["traced_bytes"] / 2**20 for r in ready]
    scale = 1000 / cfg.workers
    return {
        "register": {
            "workers": cfg.workers,
            "seconds_incl_process_start": round(register_s, 3),
            "host_seconds": [round(r["seconds"], 3) for r in registered],
        },
        "cold_start": {
            "list_ms": [round(r["list_ms"], 1) for r in ready],
            "watch_ms": [round(r["watch_ms"], 1) for r in ready],
            "n_listed": [r["n_listed"] for r in ready],
            "all_listed": all(r["n_listed"] == cfg.workers for r in ready),
        },
        "memory": {
            "rss_delta_mb": [round(x, 2) for x in rss_mb],
            "rss_delta_mb_per_1000": [round(x * scale, 2) for x in rss_mb],
            "tracemalloc_mb": [round(x, 3) for x in traced_mb],
            "tracemalloc_mb_per_1000": [round(x * scale, 3) for x in traced_mb],
            "record_bytes": len(_encoded_record()),
        },
        "propagation": {
            **_propagation(probe.ops, gateways),
            "put_p99_per_round_ms": [round(x, 2) for x in per_round_p99["put"]],
            "delete_p99_per_round_ms": [round(x, 2) for x in per_round_p99["del"]],
            "expected_events": n_probe,
            "etcd_disk_during_probes": {
                name: _histogram_delta(disk0.get(name, {}), disk1.get(name, {}))
                for name in DISK_HISTOGRAMS
            },
        },
        "mass_failure": {
            "killed": len(killed_ids),
            "all_gone": all_gone and all(s is not None for s in gone_s),
            "gone_s": [None if s is None else round(s, 3) for s in gone_s],
            "first_gone_s": [None if s is None else round(s, 3) for s in first_gone_s],
            "limit_s": limit_s,
        },
        "evictions": {
            "live_workers_deleted": len({wid for _, wid in evictions}),
            "gateway_deletes_of_live_workers": len(evictions),
            "examples": [f"{gw}:{wid}" for gw, wid in evictions[:10]],
            "host_lease_regrants": sum(f["regrants"] for f in finals_host),
            "host_unregistered": sum(f["unregistered"] for f in finals_host),
            # Per surviving host: the longest a lease went unrenewed (> TTL: evicted), the
            # slowest keep-alive round trip, and the worst event-loop lag (a 10 ms sleep's).
            "host_max_renewal_gap_s": [round(f["max_renewal_gap_s"], 3) for f in finals_host],
            "host_max_keepalive_call_s": [round(f["max_keepalive_call_s"], 3) for f in finals_host],
            "host_max_loop_lag_s": [round(f["max_loop_lag_s"], 3) for f in finals_host],
            "final_views_match": all(set(f["workers"]) == survivor_ids for f in finals_gw),
            "final_view_sizes": [len(f["workers"]) for f in finals_gw],
            "gateways_connected": all(f["connected"] for f in finals_gw),
        },
        "cpu": {
            "window_s": round(steady_s, 1),
            "gateway_cpu_s": [round(f["cpu_s"], 2) for f in finals_gw],
            "surviving_hosts_cpu_s": [round(f["cpu_s"], 2) for f in finals_host],
            "etcd_cpu_s": None
            if cpu_etcd0 is None or cpu_etcd1 is None
            else round(cpu_etcd1 - cpu_etcd0, 2),
            "gateway_rss_mb_end": [round(f["rss_kb"] / 1024, 1) for f in finals_gw],
        },
        "scheduling_stalls_ms": {
            "p99": round(percentile(stalls, 99), 1),
            "max": round(max(stalls, default=math.nan), 1),
            "over_1s": sum(x > 1000 for x in stalls),
        },
        "warnings": {
            **{gw.name: f["warnings"] for gw, f in zip(gateways, finals_gw, strict=True)},
            **{h.name: f["warnings"] for h, f in zip(survivors, finals_host, strict=True)},
        },
    }


def _encoded_record() -> bytes:
    return encode(make_record(worker_id(0), 0))


def _latencies(
    ops: list[dict[str, Any]], gateways: list[Child], kind: str, since: str = "t0"
) -> list[list[float]]:
    """Per probe op, ms from its `since` timestamp to each gateway's listener (+inf: never).

    since: "t0" the KV.Put / Lease.Revoke started (the measure), "t_call" register() /
    deregister() was called (adds register's Lease.Grant), "t1" the call returned.
    """
    out = []
    for op in ops:
        if op["kind"] != kind:
            continue
        row = []
        for gw in gateways:
            seen = (gw.gateway.first_add if kind == "put" else gw.gateway.first_del).get(op["id"])
            row.append(math.inf if seen is None else (seen - op[since]) / 1e6)
        out.append(row)
    return out


def _pooled(matrix: list[list[float]]) -> list[float]:
    return [x for row in matrix for x in row]


def _propagation(ops: list[dict[str, Any]], gateways: list[Child]) -> dict[str, Any]:
    """Latency from the write, plus the split that says where a slow one spent its time:
    etcd's answer to the write itself (raft + WAL fsync) vs. the fan-out after it.

    "<kind>" is per event: when the last gateway had it (visible at every gateway);
    "<kind>_per_gateway" pools every (event, gateway) pair.
    """
    out: dict[str, Any] = {}
    for kind, label in (("put", "put"), ("del", "delete")):
        mine = [op for op in ops if op["kind"] == kind]
        lat = _latencies(ops, gateways, kind)
        out[label] = summarize_ms([max(row) for row in lat])
        out[f"{label}_per_gateway"] = summarize_ms(_pooled(lat))
        out[f"{label}_from_call"] = summarize_ms(
            [max(row) for row in _latencies(ops, gateways, kind, "t_call")]
        )
        out[f"{label}_write_ms"] = summarize_ms([(op["t1"] - op["t0"]) / 1e6 for op in mine])
        out[f"{label}_after_ack"] = summarize_ms(_pooled(_latencies(ops, gateways, kind, "t1")))
        slowest = sorted(zip(mine, lat, strict=True), key=lambda pair: max(pair[1]))[-5:]
        out[f"{label}_slowest"] = [
            {
                "id": op["id"],
                "ms_per_gateway": [round(x, 1) for x in row],
                "write_ms": round((op["t1"] - op["t0"]) / 1e6, 1),
            }
            for op, row in reversed(slowest)
        ]
    return out


DISK_HISTOGRAMS = (
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_backend_commit_duration_seconds",
)


async def etcd_histograms(endpoint: str) -> dict[str, dict[str, float]]:
    """Cumulative bucket counts of etcd's disk histograms, from its /metrics."""
    host, port = endpoint.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n".encode())
        await writer.drain()
        body = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    out: dict[str, dict[str, float]] = {}
    for line in body.splitlines():
        name, _, rest = line.partition('_bucket{le="')
        if name in DISK_HISTOGRAMS:
            le, _, value = rest.partition('"} ')
            out.setdefault(name, {})[le] = float(value)
    return out


def _histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Count, p99 and slowest (as bucket upper bounds, ms) of what happened in between."""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    count = delta.get("+Inf", 0.0)
    bounds = sorted((float(le), n) for le, n in delta.items() if le != "+Inf")

    def bound(fraction: float) -> float | None:
        for le, n in bounds:
            if n >= fraction * count:
                return le * 1000
        return None

    return {
        "count": int(count),
        "p99_le_ms": bound(0.99) if count else None,
        "max_le_ms": bound(1.0) if count else None,
        "over_64ms": int(count - delta.get("0.064", count)),
    }


def _evictions(
    gateways: list[Child], ops: list[dict[str, Any]], killed: set[str], t_kill: int
) -> list[tuple[str, str]]:
    """Every delete a gateway applied that no deregister, kill or canary explains."""
    deregistered = {op["id"]: op["t_call"] for op in ops if op["kind"] == "del"}
    bad = []
    for gw in gateways:
        for wid, t in gw.gateway.deletes:
            if wid.startswith(CANARY):
                continue
            if wid in deregistered and t >= deregistered[wid]:
                continue
            if wid in killed and t >= t_kill:
                continue
            bad.append((gw.name, wid))
    return bad


# -- verdicts and output --------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else math.nan


def figures(r: dict[str, Any]) -> dict[str, float]:
    """The handful of numbers one run is judged by (misses count as +inf)."""
    cs, mem, prop, mf, ev = (
        r["cold_start"], r["memory"], r["propagation"], r["mass_failure"], r["evictions"]
    )  # fmt: skip
    complete = prop["put"]["n"] == prop["delete"]["n"] == prop["expected_events"]
    gone = mf["gone_s"]
    return {
        "cold_list_ms": _median(cs["list_ms"]) if cs["all_listed"] else math.inf,
        "cold_watch_ms": _median(cs["watch_ms"]),
        "rss_mb_per_1000": _median(mem["rss_delta_mb_per_1000"]),
        "traced_mb_per_1000": _median(mem["tracemalloc_mb_per_1000"]),
        "put_p99_ms": prop["put"]["p99_ms"] if complete else math.inf,
        "del_p99_ms": prop["delete"]["p99_ms"] if complete else math.inf,
        "gone_max_s": max(gone) if mf["all_gone"] and None not in gone else math.inf,
        # Distinct workers some gateway dropped while alive; a wrong final view is a miss.
        "evicted": ev["live_workers_deleted"] if ev["final_views_match"] else math.inf,
    }


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    limit: float
    worst_case: bool = False  # correctness: every run must pass, so judge the max

    def value(self, runs: Sequence[dict[str, float]]) -> float:
        values = [f[self.key] for f in runs]
        return max(values) if self.worst_case else statistics.median(values)


def rows_for(cfg: Config) -> list[Row]:
    g = cfg.gateways
    killed = sum(count for _, count in cfg.host_slices()[: cfg.hosts // 2])
    return [
        Row("cold_list_ms", f"cold start: list -> full snapshot (median of {g} gateways)",
            "ms", TARGET_COLD_START_MS),
        Row("cold_watch_ms", f"cold start: list + watch live (median of {g} gateways)",
            "ms", TARGET_COLD_START_MS),
        Row("rss_mb_per_1000", "view RSS delta per 1,000 workers", "MB",
            TARGET_MEMORY_MB_PER_1000),
        Row("traced_mb_per_1000", "snapshot (tracemalloc) per 1,000 workers", "MB",
            TARGET_MEMORY_MB_PER_1000),
        Row("put_p99_ms", f"registration seen by all {g} gateways, p99", "ms",
            TARGET_PROPAGATION_P99_MS),
        Row("del_p99_ms", f"deregistration seen by all {g} gateways, p99", "ms",
            TARGET_PROPAGATION_P99_MS),
        Row("gone_max_s", f"mass failure: {killed} killed gone at all gateways", "s",
            cfg.ttl + MASS_FAILURE_SLACK_S),
        Row("evicted", "live workers evicted (any gateway, any host)", "", 0, worst_case=True),
    ]  # fmt: skip


def _fmt(x: float) -> str:
    """Two or three significant digits; inf (something never happened) is "miss"."""
    if math.isinf(x):
        return "miss"
    if abs(x) >= 20 or x == int(x):
        return f"{x:.0f}"
    return f"{x:.2g}" if abs(x) < 1 else f"{x:.1f}"


def render(rows: list[Row], runs: Sequence[dict[str, float]]) -> str:
    table = [("metric", "per run", "result", "target", "")]
    for row in rows:
        per_run = " ".join(_fmt(f[row.key]) for f in runs)
        value = row.value(runs)
        how = ("max " if row.worst_case else "median ") if len(runs) > 1 else ""
        table.append((
            row.label, per_run, f"{how}{_fmt(value)} {row.unit}".strip(),
            f"<= {_fmt(row.limit)} {row.unit}".strip(),
            "PASS" if value <= row.limit else "MISS",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def details(r: dict[str, Any]) -> str:
    """Where the time went in one run: what a MISS needs to be explained."""
    p, mf, cpu = r["propagation"], r["mass_failure"], r["cpu"]
    fsync = p["etcd_disk_during_probes"]["etcd_disk_wal_fsync_duration_seconds"]
    lines = []
    for label in ("put", "delete"):
        s, g = p[label], p[f"{label}_per_gateway"]
        w, a = p[f"{label}_write_ms"], p[f"{label}_after_ack"]
        lines.append(
            f"  {label:>6}: at all gateways p50/p99/max {s['p50_ms']}/{s['p99_ms']}/"
            f"{s['max_ms']} ms (per gateway p99 {g['p99_ms']}); etcd's answer to the write "
            f"p99 {w['p99_ms']} ms, after the answer p99 {a['p99_ms']} ms; "
            f"p99 per round {p[f'{label}_p99_per_round_ms']}"
        )
    lines.append(
        f"  etcd WAL fsyncs meanwhile: {fsync['count']}, p99 <= {fsync['p99_le_ms']} ms, "
        f"slowest <= {fsync['max_le_ms']} ms, {fsync['over_64ms']} over 64 ms"
    )
    lines.append(
        f"  mass failure: first gone after {_median(mf['first_gone_s']):.2f} s, last after "
        f"{mf['gone_s']} s (per gateway)"
    )
    ev = r["evictions"]
    lines.append(
        f"  surviving hosts: lease re-grants {ev['host_lease_regrants']}, longest unrenewed "
        f"{ev['host_max_renewal_gap_s']} s, slowest keep-alive {ev['host_max_keepalive_call_s']}"
        f" s, keep-alive loop lag {ev['host_max_loop_lag_s']} s"
    )
    noise, st = r.get("noise", {}), r["scheduling_stalls_ms"]
    lines.append(
        f"  machine noise: cpu pressure {noise.get('cpu_pressure_pct')}%, io pressure "
        f"{noise.get('io_pressure_pct')}% of the run (share of time some task waited); "
        f"a 10 ms sleep overslept p99 {st['p99']} ms, max {st['max']} ms"
    )
    lines.append(
        f"  CPU over {cpu['window_s']} s: gateways {cpu['gateway_cpu_s']} s, surviving hosts "
        f"{cpu['surviving_hosts_cpu_s']} s, etcd {cpu['etcd_cpu_s']} s"
    )
    return "\n".join(lines)


async def one_run(
    cfg: Config, *, no_fsync: bool = False, logs: Path | None = None
) -> dict[str, Any]:
    """A fresh etcd in a temp dir, the scenario against it, then stop it. With `logs`,
    the children's stderr and etcd's log are copied there."""

    class NoFsyncEtcd(EtcdProcess):
        """Diagnosis only: takes the disk out of etcd's write path (unsafe in production)."""

        def _command(self) -> list[str]:
            return [*super()._command(), "--unsafe-no-fsync"]

    with tempfile.TemporaryDirectory(prefix="registry-scale-") as tmp:
        workdir = Path(tmp)
        etcd_cls = NoFsyncEtcd if no_fsync else EtcdProcess
        etcd = etcd_cls(workdir / "etcd-data", log_path=workdir / "etcd.log")
        await etcd.start()
        psi0, t0 = pressure(), time.monotonic()
        try:
            result = await run_scenario(
                cfg, etcd.endpoint, workdir, etcd_pid=etcd.pid, say=lambda s: print(f"  {s}")
            )
        finally:
            await etcd.stop()
            if logs is not None:
                _copy_logs(workdir, logs)
    wall = time.monotonic() - t0
    # How noisy the shared machine was: share of the run some task waited for a CPU / IO.
    result["noise"] = {
        f"{k}_pressure_pct": round(100 * (pressure()[k] - v) / 1e6 / wall, 1)
        for k, v in psi0.items()
    }
    result["noise"]["wall_s"] = round(wall, 1)
    return result


def _copy_logs(workdir: Path, logs: Path) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    for f in [*workdir.glob("*.stderr"), workdir / "etcd.log"]:
        shutil.copy(f, logs / f.name)


def pressure() -> dict[str, float]:
    """Linux PSI "some" totals (µs) for cpu and io; empty where PSI is unavailable."""
    out = {}
    for kind in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{kind}") as f:
                some = f.readline().split()
        except OSError:
            continue
        out[kind] = float(some[-1].removeprefix("total="))
    return out


def _json_safe(x: Any) -> Any:
    """Strict JSON: a miss (inf) or an empty statistic (nan) becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop when present, as `meshserve gateway` / `meshserve worker` run."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workers", type=int, default=Config.workers)
    p.add_argument("--gateways", type=int, default=Config.gateways)
    p.add_argument("--ttl", type=int, default=Config.ttl)
    p.add_argument("--hosts", type=int, default=Config.hosts, help="worker-host processes")
    p.add_argument("--probe-rounds", type=int, default=Config.probe_rounds)
    p.add_argument("--probes", type=int, default=Config.probes, help="per round")
    p.add_argument("--probe-interval", type=float, default=Config.probe_interval_s)
    p.add_argument(
        "--conn-per-worker",
        action="store_true",
        help="one TCP connection per simulated worker (default: one per host process)",
    )
    p.add_argument("--runs", type=int, help="whole scenarios, each on a fresh etcd (default 3)")
    p.add_argument("--quick", action="store_true", help="100 workers, 2 probe rounds, 1 run")
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/...)")
    p.add_argument("--logs", type=Path, help="keep every process's log here (diagnosis)")
    p.add_argument(
        "--etcd-no-fsync",
        action="store_true",
        help="diagnosis: run etcd with --unsafe-no-fsync to see what the disk costs",
    )
    p.add_argument("--role", choices=["host", "gateway", "probe"], help=argparse.SUPPRESS)
    p.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.role == "host":
        endpoint, ttl, first, count, own_conn = a.role_args
        _run(host_main(endpoint, int(ttl), int(first), int(count), own_conn == "1"))
        return 0
    if a.role == "gateway":
        endpoint, name, expect = a.role_args
        _run(gateway_main(endpoint, name, int(expect)))
        return 0
    if a.role == "probe":
        endpoint, ttl = a.role_args
        _run(probe_main(endpoint, int(ttl)))
        return 0

    cfg = Config(
        workers=100 if a.quick and a.workers == Config.workers else a.workers,
        gateways=a.gateways,
        ttl=a.ttl,
        hosts=a.hosts,
        probe_rounds=2 if a.quick and a.probe_rounds == Config.probe_rounds else a.probe_rounds,
        probes=a.probes,
        probe_interval_s=a.probe_interval,
        conn_per_worker=a.conn_per_worker,
    )
    n_runs = a.runs or (1 if a.quick else 3)
    suffixes = (
        ("_quick", a.quick),
        ("_connperworker", a.conn_per_worker),
        ("_nofsync", a.etcd_no_fsync),
    )
    name = "registry_scale" + "".join(suffix for suffix, on in suffixes if on)
    out = a.out or RESULTS_DIR / f"{name}.json"
    flag = " --unsafe-no-fsync" if a.etcd_no_fsync else ""
    print(
        f"registry at scale: {cfg.workers} workers on {cfg.hosts} hosts, {cfg.gateways} "
        f"gateways, TTL {cfg.ttl}s, {n_runs} run(s), etcd{flag}, {os.cpu_count()} CPUs"
    )
    t0 = time.monotonic()
    results, runs = [], []
    for i in range(n_runs):
        print(f"run {i + 1}/{n_runs}")
        logs = a.logs / f"run{i + 1}" if a.logs else None
        results.append(_run(one_run(cfg, no_fsync=a.etcd_no_fsync, logs=logs)))
        runs.append(figures(results[-1]))
        print(details(results[-1]))
    wall = time.monotonic() - t0
    rows = rows_for(cfg)
    print()
    print(render(rows, runs))
    verdicts = [
        {"key": r.key, "metric": r.label, "unit": r.unit, "per_run": [f[r.key] for f in runs],
         "value": r.value(runs), "aggregate": "max" if r.worst_case else "median",
         "limit": r.limit, "pass": r.value(runs) <= r.limit}
        for r in rows
    ]  # fmt: skip
    doc = {
        "benchmark": "registry_scale",
        "command": "python -m bench.registry_scale " + " ".join(sys.argv[1:]),
        "config": {**asdict(cfg), "runs": n_runs},
        "environment": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "etcd_binary": str(find_binary("etcd")),
            "etcd_unsafe_no_fsync": a.etcd_no_fsync,
            "loadavg_at_end": os.getloadavg(),
        },
        "wall_s": round(wall, 1),
        "verdicts": verdicts,
        "runs": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    print(f"\n{n_runs} run(s) in {wall:.0f}s; results in {out}")
    return 0 if all(v["pass"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
