"""From what the children reported (raw records) to the figures a run is judged by.

Pure: no clock, no I/O. Timestamps are the children's `time.monotonic_ns()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.registry_scale.config import CANARY, MASS_FAILURE_SLACK_S, NS, Config, record_bytes
from bench.registry_scale.gauges import DISK_HISTOGRAMS, Histograms
from bench.stats import median, percentile, summarize

Msg = dict[str, Any]  # one JSON line from a child


@dataclass
class GatewayLog:
    """What one gateway reported, rebuilt from its change events."""

    current: set[str] = field(default_factory=set)
    first_add: dict[str, int] = field(default_factory=dict)
    first_del: dict[str, int] = field(default_factory=dict)
    deletes: list[tuple[str, int]] = field(default_factory=list)

    def apply(self, msg: Msg) -> None:
        t = int(msg["t"])
        for wid in msg["add"]:
            self.current.add(wid)
            self.first_add.setdefault(wid, t)
        for wid in msg["del"]:
            self.current.discard(wid)
            self.first_del.setdefault(wid, t)
            self.deletes.append((wid, t))


@dataclass
class Raw:
    """One scenario run, as measured: the children's messages and the parent's marks."""

    register_s: float  # all hosts registered, process start included
    registered: list[Msg]  # per host
    ready: list[Msg]  # per gateway: its cold start
    logs: dict[str, GatewayLog]  # per gateway name, in start order
    rounds: list[list[Msg]]  # the probe's register / deregister ops, per round
    disk: tuple[Histograms, Histograms]  # etcd's, before and after the probe rounds
    t_kill: int  # when the first half of the hosts was SIGKILLed
    all_gone: bool  # the parent saw every killed worker leave every gateway in time
    finals_gw: dict[str, Msg]  # per gateway name
    finals_host: dict[str, Msg]  # per surviving host name
    steady_s: float  # from the first cold start to the finals
    etcd_cpu_s: float | None
    stalls: list[float]  # the parent's sleep overshoots, ms

    @property
    def ops(self) -> list[Msg]:
        return [op for ops in self.rounds for op in ops]


def latencies(
    ops: Sequence[Msg], logs: Sequence[GatewayLog], kind: str, since: str = "t0"
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
        for log in logs:
            seen = (log.first_add if kind == "put" else log.first_del).get(op["id"])
            row.append(math.inf if seen is None else (seen - op[since]) / 1e6)
        out.append(row)
    return out


def _pooled(matrix: list[list[float]]) -> list[float]:
    return [x for row in matrix for x in row]


def _ms(values: Sequence[float]) -> dict[str, float]:
    return summarize(values, nearest=True, suffix="_ms", digits=2)


def round_p99(ops: Sequence[Msg], logs: Sequence[GatewayLog], kind: str) -> float:
    """p99 over ops of the time until the last gateway had it."""
    return percentile([max(row) for row in latencies(ops, logs, kind)], 99, nearest=True)


def propagation(ops: Sequence[Msg], logs: Sequence[GatewayLog]) -> dict[str, Any]:
    """Latency from the write, plus the split that says where a slow one spent its time:
    etcd's answer to the write itself (raft + WAL fsync) vs. the fan-out after it.

    "<kind>" is per event: when the last gateway had it (visible at every gateway);
    "<kind>_per_gateway" pools every (event, gateway) pair.
    """
    out: dict[str, Any] = {}
    for kind, label in (("put", "put"), ("del", "delete")):
        mine = [op for op in ops if op["kind"] == kind]
        lat = latencies(ops, logs, kind)
        out[label] = _ms([max(row) for row in lat])
        out[f"{label}_per_gateway"] = _ms(_pooled(lat))
        out[f"{label}_from_call"] = _ms([max(r) for r in latencies(ops, logs, kind, "t_call")])
        out[f"{label}_write_ms"] = _ms([(op["t1"] - op["t0"]) / 1e6 for op in mine])
        out[f"{label}_after_ack"] = _ms(_pooled(latencies(ops, logs, kind, "t1")))
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


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
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


def evictions(
    logs: Mapping[str, GatewayLog], ops: Sequence[Msg], killed: set[str], t_kill: int
) -> list[tuple[str, str]]:
    """Every delete a gateway applied that no deregister, kill or canary explains."""
    deregistered = {op["id"]: op["t_call"] for op in ops if op["kind"] == "del"}
    bad = []
    for name, log in logs.items():
        for wid, t in log.deletes:
            if wid.startswith(CANARY):
                continue
            if wid in deregistered and t >= deregistered[wid]:
                continue
            if wid in killed and t >= t_kill:
                continue
            bad.append((name, wid))
    return bad


def _r(values: Sequence[float | None], digits: int) -> list[float | None]:
    return [None if v is None else round(v, digits) for v in values]


def _mass_failure(cfg: Config, raw: Raw, killed: set[str]) -> dict[str, Any]:
    # Done when no killed worker is left; timed by the last delete after the kill (one
    # already missing at the kill was evicted earlier, which is counted apart).
    gone_s: list[float | None] = []
    first_gone_s: list[float | None] = []
    for log in raw.logs.values():
        after = [t for w, t in log.deletes if w in killed and t >= raw.t_kill]
        done = not log.current & killed
        gone_s.append((max(after, default=raw.t_kill) - raw.t_kill) / NS if done else None)
        first_gone_s.append((min(after) - raw.t_kill) / NS if after else None)
    return {
        "killed": len(killed),
        "all_gone": raw.all_gone and all(s is not None for s in gone_s),
        "gone_s": _r(gone_s, 3),
        "first_gone_s": _r(first_gone_s, 3),
        "limit_s": cfg.ttl + MASS_FAILURE_SLACK_S,
    }


def _evictions(cfg: Config, raw: Raw, killed: set[str]) -> dict[str, Any]:
    bad = evictions(raw.logs, raw.ops, killed, raw.t_kill)
    hosts, gws = list(raw.finals_host.values()), list(raw.finals_gw.values())
    survivors = cfg.worker_ids(killed=False)
    return {
        "live_workers_deleted": len({wid for _, wid in bad}),
        "gateway_deletes_of_live_workers": len(bad),
        "examples": [f"{gw}:{wid}" for gw, wid in bad[:10]],
        "host_lease_regrants": sum(f["regrants"] for f in hosts),
        "host_unregistered": sum(f["unregistered"] for f in hosts),
        # Per surviving host: the longest a lease went unrenewed (> TTL: evicted), the
        # slowest keep-alive round trip, and the worst event-loop lag (a 10 ms sleep's).
        "host_max_renewal_gap_s": [round(f["max_renewal_gap_s"], 3) for f in hosts],
        "host_max_keepalive_call_s": [round(f["max_keepalive_call_s"], 3) for f in hosts],
        "host_max_loop_lag_s": [round(f["max_loop_lag_s"], 3) for f in hosts],
        "final_views_match": all(set(f["workers"]) == survivors for f in gws),
        "final_view_sizes": [len(f["workers"]) for f in gws],
        "gateways_connected": all(f["connected"] for f in gws),
    }


def _memory(cfg: Config, ready: list[Msg]) -> dict[str, Any]:
    rss_mb = [(r["rss_after_kb"] - r["rss_before_kb"]) / 1024 for r in ready]
    traced_mb = [r["traced_bytes"] / 2**20 for r in ready]
    scale = 1000 / cfg.workers
    return {
        "rss_delta_mb": [round(x, 2) for x in rss_mb],
        "rss_delta_mb_per_1000": [round(x * scale, 2) for x in rss_mb],
        "tracemalloc_mb": [round(x, 3) for x in traced_mb],
        "tracemalloc_mb_per_1000": [round(x * scale, 3) for x in traced_mb],
        "record_bytes": record_bytes(),
    }


def _propagation(cfg: Config, raw: Raw) -> dict[str, Any]:
    logs = list(raw.logs.values())
    disk0, disk1 = raw.disk
    return {
        **propagation(raw.ops, logs),
        "put_p99_per_round_ms": [round(round_p99(ops, logs, "put"), 2) for ops in raw.rounds],
        "delete_p99_per_round_ms": [round(round_p99(ops, logs, "del"), 2) for ops in raw.rounds],
        "expected_events": cfg.probe_rounds * cfg.probes,
        "etcd_disk_during_probes": {
            name: histogram_delta(disk0.get(name, {}), disk1.get(name, {}))
            for name in DISK_HISTOGRAMS
        },
    }


def analyze(cfg: Config, raw: Raw) -> dict[str, Any]:
    """One run's figures and checks (the results file's "runs" entry)."""
    killed = cfg.worker_ids(killed=True)
    hosts, gws = raw.finals_host, raw.finals_gw
    return {
        "register": {
            "workers": cfg.workers,
            "seconds_incl_process_start": round(raw.register_s, 3),
            "host_seconds": [round(r["seconds"], 3) for r in raw.registered],
        },
        "cold_start": {
            "list_ms": [round(r["list_ms"], 1) for r in raw.ready],
            "watch_ms": [round(r["watch_ms"], 1) for r in raw.ready],
            "n_listed": [r["n_listed"] for r in raw.ready],
            "all_listed": all(r["n_listed"] == cfg.workers for r in raw.ready),
        },
        "memory": _memory(cfg, raw.ready),
        "propagation": _propagation(cfg, raw),
        "mass_failure": _mass_failure(cfg, raw, killed),
        "evictions": _evictions(cfg, raw, killed),
        "cpu": {
            "window_s": round(raw.steady_s, 1),
            "gateway_cpu_s": [round(f["cpu_s"], 2) for f in gws.values()],
            "surviving_hosts_cpu_s": [round(f["cpu_s"], 2) for f in hosts.values()],
            "etcd_cpu_s": None if raw.etcd_cpu_s is None else round(raw.etcd_cpu_s, 2),
            "gateway_rss_mb_end": [round(f["rss_kb"] / 1024, 1) for f in gws.values()],
        },
        "scheduling_stalls_ms": {
            "p99": round(percentile(raw.stalls, 99, nearest=True), 1),
            "max": round(max(raw.stalls, default=math.nan), 1),
            "over_1s": sum(x > 1000 for x in raw.stalls),
        },
        "warnings": {name: f["warnings"] for name, f in (gws | hosts).items()},
    }


def figures(r: dict[str, Any]) -> dict[str, float]:
    """The handful of numbers one run is judged by (misses count as +inf)."""
    cs, mem, prop, mf, ev = (
        r["cold_start"], r["memory"], r["propagation"], r["mass_failure"], r["evictions"]
    )  # fmt: skip
    complete = prop["put"]["n"] == prop["delete"]["n"] == prop["expected_events"]
    gone = mf["gone_s"]
    return {
        "cold_list_ms": median(cs["list_ms"]) if cs["all_listed"] else math.inf,
        "cold_watch_ms": median(cs["watch_ms"]),
        "rss_mb_per_1000": median(mem["rss_delta_mb_per_1000"]),
        "traced_mb_per_1000": median(mem["tracemalloc_mb_per_1000"]),
        "put_p99_ms": prop["put"]["p99_ms"] if complete else math.inf,
        "del_p99_ms": prop["delete"]["p99_ms"] if complete else math.inf,
        "gone_max_s": max(gone) if mf["all_gone"] and None not in gone else math.inf,
        # Distinct workers some gateway dropped while alive; a wrong final view is a miss.
        "evicted": ev["live_workers_deleted"] if ev["final_views_match"] else math.inf,
    }
