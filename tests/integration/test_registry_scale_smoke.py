"""bench.registry_scale's scenario in miniature: behaviour only, no latency assertions.

Real etcd, real child processes (2 worker hosts x 10 workers, 2 gateways, 1 probe):
every registration reaches every gateway, the SIGKILLed host's workers expire
everywhere, and no gateway ever drops a worker whose keep-alive is running.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from bench.registry_scale import Config, run_scenario
from meshserve.etcd_process import EtcdProcess

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
    from types import SimpleNamespace

    from bench.registry_scale import GatewayLog, _evictions

    log = GatewayLog()
    log.apply({"t": 100, "add": ["w1", "w2", "w3", "probe-a", "canary-gw0"], "del": []})
    log.apply({"t": 200, "add": [], "del": ["probe-a", "canary-gw0", "w1"]})  # w1 before kill
    log.apply({"t": 400, "add": [], "del": ["w2", "w3"]})  # w2 killed, w3 alive
    gw: Any = SimpleNamespace(name="gw0", gateway=log)
    ops = [{"kind": "del", "id": "probe-a", "t_call": 150}]
    assert _evictions([gw], ops, killed={"w1", "w2"}, t_kill=300) == [("gw0", "w1"), ("gw0", "w3")]
