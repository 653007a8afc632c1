"""The benchmarks' pure parts: statistics, targets, and each `analyze` on hand-made raw
records (no processes, no clock)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import gateway_overhead, live, sim, stream_relay
from bench.registry_scale import analyze as reg
from bench.registry_scale.config import Config as RegistryConfig
from bench.registry_scale.verdicts import targets as registry_targets
from bench.report import Target, json_safe, targets_table
from bench.stats import median, median_at, percentile, summarize, weighted_percentile

# -- bench.stats ---------------------------------------------------------------------


def test_percentile_interpolates_or_takes_the_nearest_rank() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 50, nearest=True) == 2.0
    assert percentile(values, 99, nearest=True) == 4.0
    assert percentile([1.0, math.inf], 99, nearest=True) == math.inf  # a miss stays a miss
    assert math.isnan(percentile([], 50))


def test_median_leaves_out_what_was_not_measured() -> None:
    assert median([3.0, None, 1.0, math.nan, 2.0]) == 2.0
    assert median([1.0, 2.0]) == 1.5
    assert math.isnan(median([None]))
    rows = [{"a": {"b": 1}}, {"a": {"b": 5}}, {"a": {"b": 3}}]
    assert median_at(rows, "a", "b") == 3.0


def test_summarize_and_weighted_percentile() -> None:
    s = summarize([1.0, 2.0, 3.0, 10.0], nearest=True, suffix="_ms", digits=1)
    assert s == {"n": 4, "p50_ms": 2.0, "p99_ms": 10.0, "max_ms": 10.0}
    assert math.isnan(summarize([])["max"])
    # 1.0 counts three times, 5.0 once: the median is 1.0.
    assert weighted_percentile([1.0, 5.0], [3, 1], 50) == 1.0


# -- bench.report --------------------------------------------------------------------


def test_targets_pass_miss_and_unmeasured() -> None:
    assert Target("t", 0.4, 0.5, "ms", False).verdict == "PASS"
    assert Target("t", 0.8, 0.9, "x", True).verdict == "MISS"
    assert Target("t", math.inf, 1.0, "s", False).verdict == "MISS"
    nan = Target("t", math.nan, 1.0, "s", False)
    assert nan.verdict == "n/a" and not nan.passed


def test_results_are_strict_json_and_the_table_shows_runs() -> None:
    assert json_safe({"a": [1.0, math.inf, (math.nan,)]}) == {"a": [1.0, None, [None]]}
    t = Target("cold start", 12.0, 1000.0, "ms", False, (11.0, 12.0, 40.0), "median")
    table = targets_table([t])
    assert "11 12 40" in table and "median 12 ms" in table and "PASS" in table


# -- bench.gateway_overhead ------------------------------------------------------------


def _open_loop(p50: float, p99: float) -> dict[str, Any]:
    return {"p50_ms": p50, "p99_ms": p99, "error_codes": {}, "late_p99_ms": 0.0}


def _closed(rps: float, requests: int, hop_s: float) -> dict[str, Any]:
    cpu = {"hop": hop_s, "worker": 1.0, "client": 2.0}
    return {"rps": rps, "requests": requests, "errors": 0, "cpu_s": cpu}


def test_gateway_overhead_analysis() -> None:
    half = [
        {"trial": t, "rate_rps": 500.0, "direct": _open_loop(5.0, 6.0 + t),
         "gateway": _open_loop(5.2 + t, 7.0 + 2 * t)}
        for t in range(3)
    ]  # fmt: skip
    ceiling = [
        {"trial": 0, "gateway": _closed(900.0, 1000, 0.05), "proxy": _closed(1000.0, 1000, 0.04)},
        {"trial": 1, "gateway": _closed(950.0, 1000, 0.06), "proxy": _closed(1000.0, 1000, 0.05)},
    ]
    raw = gateway_overhead.Raw([1000.0, 1020.0], half, half, ceiling, {}, {})
    parts, targets = gateway_overhead.analyze(raw)
    s = parts["summary"]
    assert s["direct_capacity_rps"] == 1010.0
    # Added latency per trial: p50 0.2, 1.2, 2.2 and p99 1, 2, 3 ms; medians.
    assert s["latency_half_capacity"]["added_p50_ms"] == pytest.approx(1.2)
    assert s["latency_half_capacity"]["added_p99_ms"] == pytest.approx(2.0)
    assert s["rps_ratio"] == pytest.approx((0.9 + 0.95) / 2)
    assert s["hop_cpu_us_per_req"] == {"gateway": 55.0, "proxy": 45.0}
    assert s["cpu_ratio"] == pytest.approx((50 / 40 + 60 / 50) / 2)
    assert [t.verdict for t in targets] == ["MISS", "PASS", "PASS", "MISS"]
    assert parts["ceiling_trials"][0]["gateway"]["worker_cpu_us_per_req"] == 1000.0


# -- bench.stream_relay ------------------------------------------------------------------


def _streams(tps: float, ttft: float, gap: float, hop: float | None = None) -> dict[str, Any]:
    cpu = {"worker": 10.0, "client": 5.0} | ({"hop": hop} if hop is not None else {})
    figures = dict.fromkeys(stream_relay.FIGURES, 1.0)
    return figures | {"tokens_per_s": tps, "ttft_p50_ms": ttft, "gap_p50_ms": gap,
                      "cpu_us_per_token": cpu}  # fmt: skip


def test_stream_relay_analysis() -> None:
    rows = [
        {"trial": t, "direct": _streams(1000.0, 3.0, 2.0),
         "gateway": _streams(990.0 - 10 * t, 3.5 + t, 2.1, hop=30.0 + t)}
        for t in range(3)
    ]  # fmt: skip
    raw = stream_relay.Raw(rows, rows, rows, {}, {})
    parts, targets = stream_relay.analyze(raw, stream_relay.Config())
    assert [t.value for t in targets] == [
        pytest.approx(1.5),
        pytest.approx(0.1),
        31.0,
        pytest.approx(0.98),
    ]
    assert [t.verdict for t in targets] == ["MISS", "PASS", "PASS", "PASS"]
    gw = parts["summary"]["64"]["gateway"]
    assert gw["hop_cpu_us_per_token"] == 31.0 and gw["worker_cpu_us_per_token"] == 10.0
    assert "proxy" not in parts["summary"]["8"] and len(parts["trials_256"]) == 3


# -- bench.registry_scale ----------------------------------------------------------------


def _registry_raw() -> tuple[RegistryConfig, reg.Raw]:
    cfg = RegistryConfig(workers=4, gateways=2, ttl=2, hosts=2, probe_rounds=1, probes=1)
    gw0, gw1 = reg.GatewayLog(), reg.GatewayLog()
    ms = 1_000_000
    for log, lag in ((gw0, 2 * ms), (gw1, 5 * ms)):
        log.apply({"t": 0, "add": ["w00000", "w00001", "w00002", "w00003"], "del": []})
        log.apply({"t": 100 * ms + lag, "add": ["probe-r0-0000"], "del": []})
        log.apply({"t": 200 * ms + lag, "add": [], "del": ["probe-r0-0000"]})
        # The killed host's workers (w00000, w00001) go 3 s after the kill at 1 s.
        log.apply({"t": 4000 * ms, "add": [], "del": ["w00000", "w00001"]})
    ops = [
        {"kind": "put", "id": "probe-r0-0000", "t_call": 99 * ms, "t0": 100 * ms, "t1": 101 * ms},
        {"kind": "del", "id": "probe-r0-0000", "t_call": 200 * ms, "t0": 200 * ms,
         "t1": 201 * ms},
    ]  # fmt: skip
    ready = {"list_ms": 10.0, "watch_ms": 20.0, "n_listed": 4, "rss_before_kb": 1024,
             "rss_after_kb": 2048, "traced_bytes": 2**20}  # fmt: skip
    final_gw = {"workers": ["w00002", "w00003"], "connected": True, "warnings": {},
                "cpu_s": 0.1, "rss_kb": 4096}  # fmt: skip
    final_host = {"regrants": 0, "unregistered": 0, "max_renewal_gap_s": 0.7,
                  "max_keepalive_call_s": 0.01, "max_loop_lag_s": 0.002, "warnings": {},
                  "cpu_s": 0.5, "rss_kb": 8192}  # fmt: skip
    raw = reg.Raw(
        register_s=1.0, registered=[{"seconds": 0.5}] * 2, ready=[ready, ready],
        logs={"gw0": gw0, "gw1": gw1}, rounds=[ops], disk=({}, {}), t_kill=1000 * ms,
        all_gone=True, finals_gw={"gw0": final_gw, "gw1": final_gw},
        finals_host={"host1": final_host}, steady_s=5.0, etcd_cpu_s=0.3, stalls=[0.5, 1.5],
    )  # fmt: skip
    return cfg, raw


def test_registry_analysis_times_propagation_and_mass_failure() -> None:
    cfg, raw = _registry_raw()
    r = reg.analyze(cfg, raw)
    prop = r["propagation"]
    # Seen by the last gateway 5 ms after the write started; by each, 2 and 5 ms.
    assert prop["put"]["p99_ms"] == 5.0 and prop["delete"]["max_ms"] == 5.0
    assert prop["put_per_gateway"]["n"] == 2 and prop["put_per_gateway"]["p50_ms"] == 2.0
    assert prop["put_from_call"]["p99_ms"] == 6.0  # the lease grant before the put
    assert prop["put_after_ack"]["p50_ms"] == 1.0
    assert r["mass_failure"]["gone_s"] == [3.0, 3.0] and r["mass_failure"]["all_gone"]
    assert r["evictions"]["live_workers_deleted"] == 0 and r["evictions"]["final_views_match"]
    assert r["memory"]["rss_delta_mb_per_1000"] == [250.0, 250.0]  # 1 MB for 4 workers
    f = reg.figures(r)
    assert f["put_p99_ms"] == 5.0 and f["gone_max_s"] == 3.0 and f["evicted"] == 0
    verdicts = {t.key: t.verdict for t in registry_targets(cfg, [f])}
    assert verdicts["gone_max_s"] == "PASS" and verdicts["rss_mb_per_1000"] == "MISS"


def test_registry_analysis_counts_a_miss_and_an_eviction() -> None:
    cfg, raw = _registry_raw()
    raw.logs["gw1"].first_del.pop("probe-r0-0000")  # gw1 never saw the deregistration
    raw.logs["gw1"].apply({"t": 2000 * 1_000_000, "add": [], "del": ["w00002"]})  # alive
    raw.finals_gw["gw1"] = raw.finals_gw["gw1"] | {"workers": ["w00003"]}
    r = reg.analyze(cfg, raw)
    assert r["propagation"]["delete"]["p99_ms"] == math.inf
    assert r["evictions"]["examples"] == ["gw1:w00002"]
    f = reg.figures(r)
    assert f["evicted"] == math.inf  # a wrong final view is a miss, whatever the count


# -- bench.sim and bench.live ------------------------------------------------------------


def _sim_record(arm: str, reports: str, seed: int, p99: float) -> dict[str, Any]:
    cell = {"fleet": "two_speed", "sizes": "exp", "load": 0.9, "slots": 1}
    return cell | {"reports": reports, "arm": arm, "seed": seed, "p50": p99 / 2, "p99": p99}


def test_sim_analysis_takes_per_seed_ratios_then_the_median() -> None:
    records = [
        _sim_record("oracle", "fresh", 1, 10.0), _sim_record("oracle", "fresh", 2, 20.0),
        _sim_record("weighted_round_robin", "fresh", 1, 40.0),
        _sim_record("weighted_round_robin", "fresh", 2, 40.0),
        _sim_record("p2c", "fresh", 1, 15.0), _sim_record("p2c", "fresh", 2, 20.0),
        _sim_record("p2c", "stale", 1, 30.0), _sim_record("p2c", "stale", 2, 20.0),
    ]  # fmt: skip
    rows = {(r["arm"], r["reports"]): r for r in sim.analyze(records)}
    fresh, stale = rows[("p2c", "fresh")], rows[("p2c", "stale")]
    assert fresh["p99"] == 17.5
    assert fresh["p99_vs_oracle"] == pytest.approx((1.5 + 1.0) / 2)
    assert fresh["p99_vs_wrr"] == pytest.approx((15 / 40 + 20 / 40) / 2)
    assert stale["p99_vs_fresh"] == pytest.approx((2.0 + 1.0) / 2)
    assert fresh["p99_vs_fresh"] is None and fresh["p99_vs_1gw"] is None


def test_live_analysis_ratio_per_round() -> None:
    lat = [float(x) for x in range(1, 101)]
    phases = [
        live.Phase("latency_capacity", 0, 100, 0, lat),
        live.Phase("weighted_round_robin", 0, 100, 1, [2 * x for x in lat]),
    ]
    s = live.analyze(phases, rounds=1)
    assert s["p99_ratio_per_round"] == [pytest.approx(0.5)]
    assert s["p99_ms_default_median"] == pytest.approx(99.01)
    assert s["phases"][1]["errors"] == 1 and s["phases"][1]["ok"] == 100


def test_the_simulated_gateway_runs_on_the_production_estimator() -> None:
    """bench.fleet drives gateway.stats (WorkerStats, Candidates) on its virtual clock:
    deterministic per seed, and the clock's unit matters (estimates fade in seconds)."""
    from functools import partial

    from bench.fleet import FLEETS, make_workload, simulate
    from gateway.scheduler import build_policy

    speeds = FLEETS["straggler"]
    work = make_workload(1, 2000, "lognormal1.0", len(speeds))
    policy = partial(build_policy, "latency_capacity")
    a = simulate(speeds, 1, 0.9, 1.0, work, policy, seed=1)
    assert len(a) == 1800 and bool((a > 0).all())
    assert (simulate(speeds, 1, 0.9, 1.0, work, policy, seed=1) == a).all()
    slow_clock = simulate(speeds, 1, 0.9, 1.0, work, policy, seed=1, time_unit_s=0.01)
    assert not (slow_clock == a).all()
