"""The scenario's child processes, one role each, talking JSON lines on stdout and
taking commands (one line of words each) on stdin:

    python -m bench.registry_scale.children host ENDPOINT TTL FIRST COUNT OWN_CONN
    python -m bench.registry_scale.children gateway ENDPOINT NAME EXPECT
    python -m bench.registry_scale.children probe ENDPOINT TTL

Timestamps are `time.monotonic_ns()`: one CLOCK_MONOTONIC for every process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import tracemalloc
from typing import Any

from bench.registry_scale.config import CANARY, PROBE, make_record, worker_id
from bench.registry_scale.gauges import cpu_s, rss_kb, stall_meter
from registry.etcd import EtcdRegistry
from registry.observe import LEASE_KEEPALIVE, LEASE_REVOKE, PUT, NoRegistryObserver
from registry.view import RegistryView


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


class KeepAliveTimes(NoRegistryObserver):
    """One worker's keep-alives: with the host's event-loop lag, tells an eviction's
    cause apart (a host that did not get to send vs. an etcd that did not answer)."""

    def __init__(self) -> None:
        self.last_renewed = 0.0  # monotonic time the lease was last renewed (or granted)
        self.max_gap = self.max_call = 0.0  # seconds

    def _gap(self) -> float:
        now = time.monotonic()
        if self.last_renewed:
            self.max_gap = max(self.max_gap, now - self.last_renewed)
        return now

    def on_call(self, op: str, seconds: float, ok: bool) -> None:
        if op == LEASE_KEEPALIVE:
            self.max_call = max(self.max_call, seconds)
            if not ok:  # no answer: the lease went unrenewed this long, at least
                self._gap()

    def on_keepalive(self, lease_id: int, ttl: int, seconds: float) -> None:
        now = self._gap()
        if ttl > 0:
            self.last_renewed = now


class WriteStarts(NoRegistryObserver):
    """When the KV.Put / Lease.Revoke that makes the visible change started: register()
    first grants a lease, which no gateway sees."""

    write_started_ns = 0

    def on_call(self, op: str, seconds: float, ok: bool) -> None:
        if op in (PUT, LEASE_REVOKE):
            self.write_started_ns = time.monotonic_ns() - int(seconds * 1e9)


async def host_main(endpoint: str, ttl: int, first: int, count: int, own_conn: bool) -> None:
    """`count` simulated workers, one EtcdRegistry (own channel and lease) each."""
    # own_conn: each channel opens its own connection, as separate worker processes do.
    options = [("grpc.use_local_subchannel_pool", 1)] if own_conn else []
    counter = _child_logging()
    commands = await _commands()
    lag_ms: list[float] = []
    meter = asyncio.create_task(stall_meter(lag_ms))
    times = [KeepAliveTimes() for _ in range(count)]
    regs = [EtcdRegistry([endpoint], ttl=ttl, observer=t, channel_options=options) for t in times]
    for reg in regs:
        await reg.connect()
    # Spread the registrations over one keep-alive period (ttl / 3): real workers start
    # at unrelated times, so their keep-alives are not in phase either.
    spread = ttl / 3
    t0 = time.monotonic()

    async def register(i: int, reg: EtcdRegistry) -> None:
        await _sleep_until(t0 + spread * i / count)
        await reg.register(make_record(worker_id(first + i), first + i))
        times[i].last_renewed = time.monotonic()

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
                    "max_renewal_gap_s": max(t.max_gap for t in times),
                    "max_keepalive_call_s": max(t.max_call for t in times),
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


async def probe_main(endpoint: str, ttl: int) -> None:
    """Registers/deregisters one worker at a time, reporting when each call started."""
    _child_logging()
    commands = await _commands()
    _emit({"msg": "loaded"})
    while (cmd := await _next_command(commands))[0] != "exit":
        if cmd[0] != "round":
            continue
        rnd, n, interval = int(cmd[1]), int(cmd[2]), float(cmd[3])
        starts = [WriteStarts() for _ in range(n)]
        regs = [EtcdRegistry([endpoint], ttl=ttl, observer=w) for w in starts]
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
                _emit_op("put", wid, t0, starts[i].write_started_ns)
                t_next += interval
            for i, reg in enumerate(regs):
                await _sleep_until(t_next)
                wid = f"{PROBE}r{rnd}-{i:04d}"
                t0 = time.monotonic_ns()
                await reg.deregister()
                _emit_op("del", wid, t0, starts[i].write_started_ns)
                t_next += interval
        finally:
            for reg in regs:
                await reg.close()
        _emit({"msg": "round_done", "round": rnd})


def main(argv: list[str]) -> None:
    import uvloop

    role, args = argv[0], argv[1:]
    if role == "host":
        endpoint, ttl, first, count, own_conn = args
        uvloop.run(host_main(endpoint, int(ttl), int(first), int(count), own_conn == "1"))
    elif role == "gateway":
        endpoint, name, expect = args
        uvloop.run(gateway_main(endpoint, name, int(expect)))
    elif role == "probe":
        endpoint, ttl = args
        uvloop.run(probe_main(endpoint, int(ttl)))
    else:
        raise SystemExit(f"unknown role {role!r}: host, gateway or probe")


if __name__ == "__main__":
    main(sys.argv[1:])
