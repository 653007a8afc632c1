"""Gateway overhead on unary Infer: added latency, throughput ceiling, CPU per request.

The worker is the FakeBackend (simulated service time, no model): one `echo` Infer model
(one small FP32 tensor in, the same tensor out) with per_request_ms=5 fixed, 256 slots,
worker capacity 1024. Etcd, worker, gateway, bare proxy (bench/proxy.py) and the load
generator (grpc.aio on uvloop) are separate processes on 127.0.0.1.

(a) latency: open-loop Poisson arrivals at half the direct capacity (measured first,
    closed loop), direct-to-worker vs through the gateway, same arrival schedule.
(b) ceiling: per-request work 0 ms (the `fake_work_ms` input), closed loop at high
    concurrency through the gateway vs through the bare proxy, same worker; CPU per
    request of the hop = its utime+stime delta over the window / requests in the window.

Arms alternate (A B A B ...) within one run; each statistic is the median over trials.

    python -m bench.gateway_overhead            # full (about 3 minutes)
    python -m bench.gateway_overhead --quick    # about 1 minute
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.cpu import pinning
from bench.procs import Rig, hop_rig
from bench.report import Target, finish, machine, results_path
from bench.stats import median, median_at
from bench.unary_load import MODEL, infer_payload, infer_probe

PER_REQUEST_MS = 5.0
SLOTS = 256
CAPACITY = 1024
JOB = "bench.unary_load"
MAX_REQUESTS = 2_000_000
WORKER_OPTIONS = {
    "per_request_ms": str(PER_REQUEST_MS),
    "distribution": "fixed",
    "slots": str(SLOTS),
    "max_queue": "4096",
}
# The compared arms, named by the process their calls go to.
LATENCY_ARMS = ("direct", "gateway")  # open loop, one arrival schedule: what the hop adds
CEILING_ARMS = ("gateway", "proxy")  # closed loop, no simulated work: what the hop costs
Row = dict[str, Any]


@dataclass(frozen=True)
class Config:
    trials: int = 5
    window_s: float = 5.0  # measured per arm
    warmup_s: float = 1.0  # before each window
    capacity_window_s: float = 3.0
    concurrency: int = 128  # closed-loop callers of (b)
    capacity_concurrency: int = 256
    light_fraction: float = 0.1  # the light-load reference rate, of the direct capacity
    pin: str = "none"
    quick: bool = False
    metrics: bool = False  # the gateway with its Prometheus metrics on (--metrics-port 0)

    def quickened(self) -> Config:
        return replace(
            self, trials=3, window_s=2.0, warmup_s=0.5, capacity_window_s=2.0, quick=True
        )

    @property
    def timeout_s(self) -> float:
        return self.warmup_s + self.window_s + 60


@dataclass
class Raw:
    """What the phases measured: the load generator's results, per trial and arm."""

    capacity_rps: list[float]
    half: list[Row]  # {"trial", "rate_rps", arm: open_loop result}
    light: list[Row]
    ceiling: list[Row]  # {"trial", arm: closed_loop result with "cpu_s" per role}
    pinning: dict[str, list[int] | None]
    machine: dict[str, Any]


# -- phases ----------------------------------------------------------------------------


def _closed_loop(
    cfg: Config, target: str, payload: bytes, pids: list[int], *, capacity: bool = False
) -> dict[str, Any]:
    """A closed_loop job: the capacity phase's callers and window, or the ceiling's."""
    callers = cfg.capacity_concurrency if capacity else cfg.concurrency
    window = cfg.capacity_window_s if capacity else cfg.window_s
    return {"target": target, "payload": payload, "concurrency": callers, "cpu_pids": pids,
            "warmup_s": cfg.warmup_s, "window_s": window, "max_requests": MAX_REQUESTS}  # fmt: skip


async def capacity_phase(rig: Rig, cfg: Config) -> list[float]:
    """Direct capacity (closed loop, 5 ms calls): sets the open-loop rates."""
    worker, rps = rig.procs["direct"], []
    for t in range(cfg.trials):
        job = _closed_loop(cfg, worker.address, infer_payload(None), [worker.pid], capacity=True)
        r = await rig.loadgen.run(f"{JOB}:closed_loop", job, cfg.timeout_s)
        rps.append(r["rps"])
        print(f"  capacity trial {t}: direct {r['rps']:.0f} req/s (errors {r['errors']})")
    return rps


async def latency_phase(rig: Rig, cfg: Config, rate: float, label: str) -> list[Row]:
    """Open-loop trials, arms alternating; the same arrival schedule for both arms."""
    rows: list[Row] = []
    for t in range(cfg.trials):
        row: Row = {"trial": t, "rate_rps": rate}
        for arm in LATENCY_ARMS:
            job = {
                "target": rig.procs[arm].address,
                "payload": infer_payload(None),
                "rate": rate,
                "seed": 1000 + t,
                "warmup_s": cfg.warmup_s,
                "window_s": cfg.window_s,
            }
            row[arm] = await rig.loadgen.run(f"{JOB}:open_loop", job, cfg.timeout_s)
            rig.mesh.check_alive()
        rows.append(row)
        print(f"  {label} load trial {t}: {describe_latency(latency_row(row))}", flush=True)
    return rows


async def ceiling_phase(rig: Rig, cfg: Config) -> list[Row]:
    """Closed loop with no simulated work, arms alternating: CPU seconds per role."""
    worker, rows = rig.procs["direct"], []
    for t in range(cfg.trials):
        row: Row = {"trial": t}
        for arm in CEILING_ARMS:
            hop = rig.procs[arm]
            roles = {"hop": hop.pid, "worker": worker.pid, "client": rig.loadgen.pid}
            job = _closed_loop(cfg, hop.address, infer_payload(0.0), list(roles.values()))
            r = await rig.loadgen.run(f"{JOB}:closed_loop", job, cfg.timeout_s)
            rig.mesh.check_alive()
            cpu = r.pop("cpu_s")
            row[arm] = r | {"cpu_s": {role: cpu[str(pid)] for role, pid in roles.items()}}
        rows.append(row)
        print(f"  ceiling trial {t}: {describe_ceiling(ceiling_row(row))}", flush=True)
    return rows


async def measure(cfg: Config) -> Raw:
    load0 = os.getloadavg()
    pin = pinning(cfg.pin)
    async with hop_rig(
        "meshserve-bench-overhead-",
        pin,
        models=[f"{MODEL}:infer"],
        options=WORKER_OPTIONS,
        capacity=CAPACITY,
        probe=infer_probe,
        gateway_args=["--metrics-port", "0"] if cfg.metrics else [],
    ) as rig:
        print(
            f"FakeBackend worker (simulated service time): {MODEL} per_request_ms="
            f"{PER_REQUEST_MS:g} fixed, slots={SLOTS}, capacity={CAPACITY}; pinning: "
            f"{pin.describe()}; {cfg.trials} trials, {cfg.window_s:g} s windows",
            flush=True,
        )
        caps = await capacity_phase(rig, cfg)
        rate, light = median(caps) / 2, median(caps) * cfg.light_fraction
        print(
            f"direct capacity {median(caps):.0f} req/s -> open-loop Poisson at {rate:.0f} "
            f"req/s (and {light:.0f} req/s, light-load reference)",
            flush=True,
        )
        half = await latency_phase(rig, cfg, rate, "half")
        light_rows = await latency_phase(rig, cfg, light, "light")
        ceiling = await ceiling_phase(rig, cfg)
    return Raw(caps, half, light_rows, ceiling, pin.as_dict(), machine(load0))


# -- analysis (pure) -------------------------------------------------------------------


def latency_row(row: Row) -> Row:
    """A latency trial with what the gateway added."""
    d, g = row["direct"], row["gateway"]
    return row | {
        "added_p50_ms": g["p50_ms"] - d["p50_ms"],
        "added_p99_ms": g["p99_ms"] - d["p99_ms"],
    }


def ceiling_row(row: Row) -> Row:
    """A ceiling trial with CPU per request per role, and gateway / proxy ratios."""
    out = dict(row)
    for arm in CEILING_ARMS:
        r = dict(row[arm])
        for role, seconds in r.pop("cpu_s").items():
            r[f"{role}_cpu_us_per_req"] = seconds / r["requests"] * 1e6
        out[arm] = r
    g, p = out["gateway"], out["proxy"]
    out["rps_ratio"] = g["rps"] / p["rps"]
    out["cpu_ratio"] = g["hop_cpu_us_per_req"] / p["hop_cpu_us_per_req"]
    return out


def _latency_summary(rows: list[Row], rate: float) -> dict[str, float]:
    per_arm = {
        f"{arm}_{q}_ms": median_at(rows, arm, f"{q}_ms")
        for arm in LATENCY_ARMS
        for q in ("p50", "p99")
    }
    return {
        "rate_rps": rate,
        **per_arm,
        "added_p50_ms": median_at(rows, "added_p50_ms"),
        "added_p99_ms": median_at(rows, "added_p99_ms"),
    }


def analyze(raw: Raw) -> tuple[dict[str, Any], list[Target]]:
    """The trials with their derived figures, the summary (medians over trials), targets."""
    half, light = [latency_row(r) for r in raw.half], [latency_row(r) for r in raw.light]
    ceiling = [ceiling_row(r) for r in raw.ceiling]
    summary: dict[str, Any] = {
        "direct_capacity_rps": median(raw.capacity_rps),
        "latency_half_capacity": _latency_summary(half, half[0]["rate_rps"] if half else 0.0),
        "latency_light_load": _latency_summary(light, light[0]["rate_rps"] if light else 0.0),
        "ceiling_rps": {arm: median_at(ceiling, arm, "rps") for arm in CEILING_ARMS},
        "hop_cpu_us_per_req": {
            arm: median_at(ceiling, arm, "hop_cpu_us_per_req") for arm in CEILING_ARMS
        },
        "rps_ratio": median_at(ceiling, "rps_ratio"),
        "cpu_ratio": median_at(ceiling, "cpu_ratio"),
    }
    lat = summary["latency_half_capacity"]
    targets = [
        Target("added p50 latency (gateway - direct)", lat["added_p50_ms"], 0.5, "ms", False),
        Target("added p99 latency (gateway - direct)", lat["added_p99_ms"], 2.0, "ms", False),
        Target("throughput gateway / proxy", summary["rps_ratio"], 0.9, "x", True),
        Target("CPU per request gateway / proxy", summary["cpu_ratio"], 1.1, "x", False),
    ]
    trials = {
        "capacity_trials_rps": raw.capacity_rps,
        "latency_trials": half,
        "light_latency_trials": light,
        "ceiling_trials": ceiling,
    }
    return {"summary": summary, **trials}, targets


def describe_latency(r: Row) -> str:
    d, g = r["direct"], r["gateway"]
    return (
        f"direct p50 {d['p50_ms']:.2f} p99 {d['p99_ms']:.2f} ms | gateway p50 "
        f"{g['p50_ms']:.2f} p99 {g['p99_ms']:.2f} ms | added p50 {r['added_p50_ms']:+.2f} "
        f"p99 {r['added_p99_ms']:+.2f} ms (errors {d['error_codes'] or 0}/"
        f"{g['error_codes'] or 0}, client late p99 {d['late_p99_ms']:.2f}/"
        f"{g['late_p99_ms']:.2f} ms)"
    )


def describe_ceiling(r: Row) -> str:
    g, p = r["gateway"], r["proxy"]
    return (
        f"gateway {g['rps']:.0f} req/s {g['hop_cpu_us_per_req']:.0f} us CPU/req | proxy "
        f"{p['rps']:.0f} req/s {p['hop_cpu_us_per_req']:.0f} us CPU/req | ratio rps "
        f"{r['rps_ratio']:.3f} cpu {r['cpu_ratio']:.3f} (worker "
        f"{g['worker_cpu_us_per_req']:.0f}/{p['worker_cpu_us_per_req']:.0f}, client "
        f"{g['client_cpu_us_per_req']:.0f}/{p['client_cpu_us_per_req']:.0f} us/req; "
        f"errors {g['errors']}/{p['errors']})"
    )


def render(s: dict[str, Any]) -> str:
    lines = ["FakeBackend worker (simulated service time); medians over trials:"]
    for key, name in (("latency_half_capacity", "half capacity"), ("latency_light_load", "light")):
        lat = s[key]
        lines.append(
            f"  {name} load, {lat['rate_rps']:.0f} req/s: p50 direct {lat['direct_p50_ms']:.2f} "
            f"ms, gateway {lat['gateway_p50_ms']:.2f} ms; p99 direct {lat['direct_p99_ms']:.2f} "
            f"ms, gateway {lat['gateway_p99_ms']:.2f} ms; added p50 {lat['added_p50_ms']:+.2f} "
            f"ms, p99 {lat['added_p99_ms']:+.2f} ms"
        )
    rps, cpu = s["ceiling_rps"], s["hop_cpu_us_per_req"]
    lines.append(
        f"  ceiling: gateway {rps['gateway']:.0f} req/s, proxy {rps['proxy']:.0f} req/s (ratio "
        f"{s['rps_ratio']:.3f}); hop CPU/req gateway {cpu['gateway']:.0f} us, proxy "
        f"{cpu['proxy']:.0f} us (ratio {s['cpu_ratio']:.3f})"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    ap = argparse.ArgumentParser(prog="python -m bench.gateway_overhead", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter trials")
    ap.add_argument("--trials", type=int, default=Config.trials)
    ap.add_argument("--window", type=float, default=Config.window_s, help="seconds per arm")
    ap.add_argument("--warmup", type=float, default=Config.warmup_s, help="before each window")
    ap.add_argument("--capacity-window", type=float, default=Config.capacity_window_s)
    ap.add_argument("--concurrency", type=int, default=Config.concurrency, help="callers, (b)")
    ap.add_argument("--capacity-concurrency", type=int, default=Config.capacity_concurrency)
    ap.add_argument(
        "--light-fraction",
        type=float,
        default=Config.light_fraction,
        help="light-load reference rate, as a fraction of the direct capacity",
    )
    ap.add_argument("--pin", choices=("none", "split"), default="none")
    ap.add_argument("--metrics", action="store_true", help="the gateway with metrics on")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cfg = Config(
        a.trials,
        a.window,
        a.warmup,
        a.capacity_window,
        a.concurrency,
        a.capacity_concurrency,
        a.light_fraction,
        a.pin,
        metrics=a.metrics,
    )
    return (cfg.quickened() if a.quick else cfg), a.out


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    import uvloop

    raw = uvloop.run(measure(cfg))
    parts, targets = analyze(raw)
    print()
    print(render(parts["summary"]))
    config = {
        "model": MODEL,
        "per_request_ms": PER_REQUEST_MS,
        "slots": SLOTS,
        "capacity": CAPACITY,
        **asdict(cfg),
        "pinning": raw.pinning,
    }
    doc = {
        "benchmark": "gateway_overhead",
        "backend": "FakeBackend (simulated service time, no model)",
        "quick": cfg.quick,
        "config": config,
        "machine": raw.machine,
    } | parts
    name = "gateway_overhead.quick" if cfg.quick else "gateway_overhead"
    finish(doc, targets, results_path(out, name))


if __name__ == "__main__":
    main()
