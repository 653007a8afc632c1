"""Fault injection under a mixed load, with real processes: etcd, a gateway and 4
FakeBackend workers (simulated timing, no weights). Each test injects one fault and
checks what the client saw: calls lost, streams broken, no call past its deadline.

Detection and recovery times are recorded as test properties (`record_property`);
they are asserted only with generous bounds (shared 2-core machines)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshserve.etcd_process import EtcdProcess
from tests.chaos.mixed_load import DEADLINE_S, MixedLoad, wait_in_view
from tests.procs import Proc, Procs, processes, wait_models

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORKERS = 4
LONG_STREAM_TOKENS = 300  # 3 s at 10 ms a token: open across the kill
FAKE_OPTIONS = ("per_request_ms=2", "per_token_ms=10", "slots=8", "seed=1")
ENV = {
    "MESHSERVE_WORKER_LEASE_TTL": "3",
    "MESHSERVE_WORKER_DRAIN_GRACE_S": "5",
    "MESHSERVE_GATEWAY_DRAIN_GRACE_S": "5",
}
Record = Callable[[str, object], None]


@dataclass
class Fleet:
    etcd: EtcdProcess
    procs: Procs
    gateway: Proc
    workers: dict[str, Proc]

    def spawn_worker(self, wid: str) -> Proc:
        args = ["worker", "--etcd", self.etcd.endpoint, "--worker-id", wid,
                "--fake", "gen", "--fake", "echo:infer"]  # fmt: skip
        for o in FAKE_OPTIONS:
            args += ["--fake-option", o]
        proc = self.workers[wid] = self.procs.spawn(wid, args, metrics=False)
        return proc


@pytest.fixture
async def fleet(etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with processes(tmp_path, **ENV) as procs:
        gateway = procs.spawn("gateway", ["gateway", "--etcd", etcd.endpoint], metrics=False)
        f = Fleet(etcd, procs, gateway, {})
        for i in range(WORKERS):
            f.spawn_worker(f"c{i}")
        await wait_models(gateway, ["gen", "echo"])
        yield f


async def _loaded(fleet: Fleet) -> MixedLoad:
    load = MixedLoad(fleet.gateway.address)
    await load.__aenter__()
    await load.wait_ok(20)  # every worker in play before the fault
    return load


def _no_call_past_its_deadline(load: MixedLoad) -> None:
    longest = max(o.ended - o.started for o in load.outcomes)
    assert longest < DEADLINE_S + 2.0, f"a call took {longest:.1f} s"


async def test_kill_9_a_worker_mid_stream_loses_nothing(
    fleet: Fleet, record_property: Record
) -> None:
    load = await _loaded(fleet)
    try:
        victim = fleet.workers["c0"]
        # One long stream open on each worker (the load's own streams may be anywhere).
        spread = await load.spread_streams(len(fleet.workers), LONG_STREAM_TOKENS)
        killed = time.monotonic()
        victim.child.kill()
        await victim.child.wait(10)
        await load.wait_ok(50)
        long = [await t for t in spread]
    finally:
        await load.__aexit__()
    assert [o.code for o in long] == ["OK"] * len(long) and all(o.exact for o in long)
    assert sum(o.resumed for o in long) == 1  # the one that was on c0
    assert load.failed("unary") == {}  # every unanswered call was retried elsewhere
    # Streams open on the killed worker moved to another one, token for token.
    assert load.failed("stream") == {}
    assert load.resumed() >= 1
    assert load.inexact() == 0
    _no_call_past_its_deadline(load)
    last = max((o.started for o in load.outcomes if o.worker == "c0"), default=killed)
    record_property("streams_migrated", load.resumed())
    record_property("last_call_served_by_victim_after_kill_s", round(last - killed, 3))


async def test_sigstop_shorter_than_the_deadline_loses_nothing(fleet: Fleet) -> None:
    load = await _loaded(fleet)
    try:
        victim = fleet.workers["c1"].child
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)  # the fault's duration: wall clock by design
        finally:
            os.kill(victim.pid, signal.SIGCONT)
        await load.wait_ok(30)
    finally:
        await load.__aexit__()
    assert load.failed("unary") == {}
    assert load.failed("stream") == {}
    _no_call_past_its_deadline(load)


async def test_sigterm_drain_of_a_worker_loses_nothing(fleet: Fleet) -> None:
    load = await _loaded(fleet)
    try:
        victim = fleet.workers["c2"].child
        victim.terminate()
        assert await victim.wait(15) == 0
        await load.wait_ok(30)
    finally:
        await load.__aexit__()
    assert load.failed("unary") == {}
    assert load.failed("stream") == {}


async def test_rolling_restart_of_every_worker_loses_nothing(
    fleet: Fleet, record_property: Record
) -> None:
    load = await _loaded(fleet)
    t0 = time.monotonic()
    try:
        for wid in list(fleet.workers):
            old = fleet.workers[wid].child
            old.terminate()
            assert await old.wait(15) == 0
            new = fleet.spawn_worker(wid)
            await wait_in_view(fleet.gateway.address, wid, new.address)
            await load.wait_ok(10)  # serving with the new one before the next goes
    finally:
        await load.__aexit__()
    assert load.failed("unary") == {}
    assert load.failed("stream") == {}
    record_property("rolling_restart_s", round(time.monotonic() - t0, 1))
    record_property("calls", len(load.outcomes))


async def test_etcd_killed_for_20s_loses_nothing(fleet: Fleet) -> None:
    load = await _loaded(fleet)
    try:
        fleet.etcd.kill()
        await asyncio.sleep(20.0)  # the outage's duration: wall clock by design
        await fleet.etcd.restart()
        await load.wait_ok(30)
    finally:
        await load.__aexit__()
    assert load.failed("unary") == {}
    assert load.failed("stream") == {}
