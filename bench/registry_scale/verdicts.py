"""How the registry's runs are judged (targets over runs) and explained (details)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.registry_scale.config import (
    MASS_FAILURE_SLACK_S,
    TARGET_COLD_START_MS,
    TARGET_MEMORY_MB_PER_1000,
    TARGET_PROPAGATION_P99_MS,
    Config,
)
from bench.report import Target
from bench.stats import median


@dataclass(frozen=True)
class Row:
    """A target over runs: one figure of `analyze.figures` per run, and its limit."""

    key: str
    label: str
    unit: str
    limit: float
    worst_case: bool = False  # correctness: every run must pass, so judge the max

    def target(self, runs: Sequence[dict[str, float]]) -> Target:
        values = tuple(f[self.key] for f in runs)
        value = max(values) if self.worst_case else median(values)
        how = "max" if self.worst_case else "median"
        return Target(self.label, value, self.limit, self.unit, False, values, how, self.key)


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


def targets(cfg: Config, runs: Sequence[dict[str, float]]) -> list[Target]:
    return [row.target(runs) for row in rows_for(cfg)]


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
        f"  mass failure: first gone after {median(mf['first_gone_s']):.2f} s, last after "
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
