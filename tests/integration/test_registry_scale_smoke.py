"""bench.registry_scale's scenario in miniature: behaviour only, no latency assertions.

Real etcd, real child processes (2 worker hosts x 10 workers, 2 gateways, 1 probe):
every registration reaches every gateway, the SIGKILLed host's workers expire
everywhere, and no gateway ever drops a worker whose keep-alive is running.
Plus the keep-alive regression the benchmark found: leases must hold when etcd is slow.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from bench.registry_scale import Config, make_record, run_scenario
from meshserve.etcd_process import EtcdProcess, free_port
from registry.etcd import EtcdRegistry

CFG = Config(
    workers=20,
    gateways=2,
    ttl=2,
    hosts=2,
    probe_rounds=1,
    probes=5,
    probe_interval_s=0.02,
    hold_s=2.0,
)


@pytest.mark.timeout(90)
async def test_registry_scale_smoke(etcd: EtcdProcess, tmp_path: Path) -> None:
    r = await asyncio.wait_for(run_scenario(CFG, etcd.endpoint, tmp_path), 80)

    # Cold start: each gateway's first list had every worker.
    assert r["cold_start"]["n_listed"] == [CFG.workers] * CFG.gateways

    # Every probe registration and deregistration reached every gateway (a miss is inf).
    prop = r["propagation"]
    for kind in ("put", "delete"):
        assert prop[kind]["n"] == CFG.probe_rounds * CFG.probes
        assert prop[f"{kind}_per_gateway"]["n"] == CFG.probe_rounds * CFG.probes * CFG.gateways
        assert math.isfinite(prop[kind]["max_ms"]), prop[kind]

    # The killed host's workers are gone from every gateway.
    mf = r["mass_failure"]
    assert mf["killed"] == CFG.workers // 2
    assert mf["all_gone"], mf
    assert all(s is not None for s in mf["gone_s"])

    # Nobody else was ever deleted, no keep-alive had to re-grant, and every gateway
    # ends with exactly the surviving workers.
    ev = r["evictions"]
    assert ev["live_workers_deleted"] == ev["gateway_deletes_of_live_workers"] == 0, ev["examples"]
    assert ev["host_lease_regrants"] == 0
    assert ev["host_unregistered"] == 0
    assert ev["final_views_match"], ev["final_view_sizes"]
    assert ev["gateways_connected"]


def test_eviction_check_flags_unexplained_deletes() -> None:
    """The detector itself: only deregistered (after the call), killed (after the kill)
    and canary deletes are explained."""
    from bench.registry_scale.analyze import GatewayLog, evictions

    log = GatewayLog()
    log.apply({"t": 100, "add": ["w1", "w2", "w3", "probe-a", "canary-gw0"], "del": []})
    log.apply({"t": 200, "add": [], "del": ["probe-a", "canary-gw0", "w1"]})  # w1 before kill
    log.apply({"t": 400, "add": [], "del": ["w2", "w3"]})  # w2 killed, w3 alive
    ops: list[dict[str, Any]] = [{"kind": "del", "id": "probe-a", "t_call": 150}]
    bad = evictions({"gw0": log}, ops, killed={"w1", "w2"}, t_kill=300)
    assert bad == [("gw0", "w1"), ("gw0", "w3")]


class DelayProxy:
    """TCP proxy that holds every chunk `delay` seconds each way (0 until set)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", free_port())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._spawn(self._pipe(reader, up_writer))
        self._spawn(self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(due - loop.time(), 0))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
            await asyncio.sleep(self.delay + 0.1)  # let the last chunks through
        finally:
            sender.cancel()
            writer.close()


@pytest.mark.timeout(60)
async def test_leases_hold_when_etcd_answers_slowly(etcd: EtcdProcess) -> None:
    """Every etcd round trip takes 1.2 s, so grant + put take 2.4 s of the 3 s TTL. The
    first renewal must count from the grant: a whole interval after the put (as before)
    arrived after the lease had expired, and after every re-grant again (workers flapped)."""
    async with DelayProxy(etcd.client_port) as proxy:
        regs = [EtcdRegistry([f"127.0.0.1:{proxy.port}"], ttl=3, op_timeout=5) for _ in range(3)]
        try:
            for reg in regs:  # connect before the delay: gRPC gives a handshake <= 1 s
                await reg.connect()
                await reg.ping()
            proxy.delay = 0.6
            await asyncio.gather(*(r.register(make_record(f"w{i}", i)) for i, r in enumerate(regs)))
            leases = [r.lease_id for r in regs]
            await asyncio.sleep(5)  # the old schedule lost every lease by now
            assert [r.lease_id for r in regs] == leases  # no re-grant: never expired
            async with EtcdRegistry([etcd.endpoint]) as direct:
                workers, _ = await direct.list_workers()
            assert set(workers) == {"w0", "w1", "w2"}
        finally:
            proxy.delay = 0.0
            for reg in regs:
                await reg.close()
