"""Streaming relay: what the gateway adds to Generate streams, and what it costs per token.

The worker is the FakeBackend (simulated timing, no model): model `stream` emits one
token every 2 ms (per_token_ms=2) after per_request_ms=1, max_tokens=200 per stream,
512 slots, worker capacity 1024. Closed loop: N client tasks each run streams back to
back (starts staggered over one stream's length), at 8 streams (light-load reference),
64 and 256. Arms: direct to the worker, through the gateway, and (at 8 and 64 streams,
for reference) through the bare proxy bench/proxy.py, which relays every message as it
comes. Arms alternate (A B C A B C ...) within one run; each statistic is the median
over trials.

Tokens, gaps and CPU per token are counted as bench/stream_load.py says.

    python -m bench.stream_relay            # full (about 2 minutes)
    python -m bench.stream_relay --quick
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
from bench.stream_load import MODEL, generate_payload, generate_probe

PER_TOKEN_MS = 2.0
PER_REQUEST_MS = 1.0
MAX_TOKENS = 200
SLOTS = 512
CAPACITY = 1024
JOB = "bench.stream_load:streams"
WORKER_OPTIONS = {
    "per_request_ms": str(PER_REQUEST_MS),
    "per_token_ms": str(PER_TOKEN_MS),
    "distribution": "fixed",
    "slots": str(SLOTS),
    "max_queue": "4096",
}
# The compared arms, named by the process their streams go to; the proxy is a reference
# at the light and the main stream counts only.
ARMS = ("direct", "gateway", "proxy")
HIGH_ARMS = ("direct", "gateway")
HOPS = ("gateway", "proxy")
FIGURES = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms",
           "msg_gap_p50_ms", "messages_per_token")  # fmt: skip
Row = dict[str, Any]


@dataclass(frozen=True)
class Config:
    trials: int = 3
    window_s: float = 4.0  # measured per arm
    warmup_s: float = 1.0  # before each window
    streams: int = 64
    streams_high: int = 256
    streams_light: int = 8  # the light-load reference (no targets)
    proxy: bool = True  # the bare-proxy reference arm
    pin: str = "none"
    quick: bool = False

    def quickened(self) -> Config:
        return replace(self, trials=3, window_s=2.0, warmup_s=0.6, quick=True)


@dataclass
class Raw:
    """What the phases measured: the load generator's results, per trial and arm."""

    light: list[Row]  # {"trial", arm: streams result, CPU per token by role}
    main: list[Row]
    high: list[Row]
    pinning: dict[str, list[int] | None]
    machine: dict[str, Any]


async def phase(rig: Rig, cfg: Config, arms: tuple[str, ...], concurrency: int) -> list[Row]:
    """Closed-loop trials at `concurrency` streams, arms alternating."""
    stream_s = (PER_REQUEST_MS + PER_TOKEN_MS * (MAX_TOKENS - 1)) / 1000
    roles = {"worker": rig.procs["direct"].pid, "client": rig.loadgen.pid}
    pids = sorted({*roles.values(), *(rig.procs[h].pid for h in HOPS)})
    rows: list[Row] = []
    for t in range(cfg.trials):
        row: Row = {"trial": t}
        for arm in arms:
            job = {"target": rig.procs[arm].address, "payload": generate_payload(MAX_TOKENS),
                   "concurrency": concurrency, "warmup_s": cfg.warmup_s,
                   "window_s": cfg.window_s, "stagger_s": stream_s, "cpu_pids": pids,
                   "max_streams": 200_000}  # fmt: skip
            r = await rig.loadgen.run(JOB, job, cfg.warmup_s + cfg.window_s + 180)
            rig.mesh.check_alive()
            per_token, _ = r.pop("cpu_us_per_token"), r.pop("cpu_s")
            mine = roles | ({"hop": rig.procs[arm].pid} if arm in HOPS else {})
            cpu = {k: per_token[str(p)] for k, p in mine.items()}
            row[arm] = r | {"cpu_us_per_token": cpu}
            if "hop" in cpu:
                row[arm]["hop_cpu_us_per_message"] = cpu["hop"] * r["tokens"] / r["messages"]
            print(f"  {concurrency:>3} streams trial {t} {arm:<8} {describe(row[arm])}", flush=True)
        rows.append(row)
    return rows


async def measure(cfg: Config) -> Raw:
    load0 = os.getloadavg()
    pin = pinning(cfg.pin)
    async with hop_rig(
        "meshserve-bench-stream-",
        pin,
        models=[MODEL],
        options=WORKER_OPTIONS,
        capacity=CAPACITY,
        probe=generate_probe,
    ) as rig:
        print(
            f"FakeBackend worker (simulated timing): {MODEL} per_token_ms={PER_TOKEN_MS:g}, "
            f"per_request_ms={PER_REQUEST_MS:g}, max_tokens={MAX_TOKENS}, slots={SLOTS}, "
            f"capacity={CAPACITY}; pinning: {pin.describe()}; {cfg.trials} trials, "
            f"{cfg.window_s:g} s windows",
            flush=True,
        )
        arms = ARMS if cfg.proxy else HIGH_ARMS
        light = await phase(rig, cfg, arms, cfg.streams_light)
        main = await phase(rig, cfg, arms, cfg.streams)
        high = await phase(rig, cfg, HIGH_ARMS, cfg.streams_high)
    return Raw(light, main, high, pin.as_dict(), machine(load0))


# -- analysis (pure) -------------------------------------------------------------------


def _median_diff(rows: list[Row], a: str, b: str, key: str) -> float:
    return median(float(r[a][key]) - float(r[b][key]) for r in rows)


def _median_ratio(rows: list[Row], a: str, b: str, key: str) -> float:
    return median(float(r[a][key]) / float(r[b][key]) for r in rows)


def _summary(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per arm, medians over trials of each figure and of CPU per token per role."""
    out = {}
    for arm in (a for a in ARMS if a in rows[0]):
        figures = {key: median_at(rows, arm, key) for key in FIGURES}
        roles = rows[0][arm]["cpu_us_per_token"]
        cpu = {f"{r}_cpu_us_per_token": median_at(rows, arm, "cpu_us_per_token", r) for r in roles}
        out[arm] = figures | cpu
    return out


def analyze(raw: Raw, cfg: Config) -> tuple[dict[str, Any], list[Target]]:
    """The summary per stream count (medians over trials) and the targets."""
    n, hi, lo = cfg.streams, cfg.streams_high, cfg.streams_light
    main = raw.main
    targets = [
        Target(f"added TTFT p50 @{n} (gateway - direct)",
               _median_diff(main, "gateway", "direct", "ttft_p50_ms"), 1.0, "ms", False),
        Target(f"added token gap p50 @{n} (gateway - direct)",
               _median_diff(main, "gateway", "direct", "gap_p50_ms"), 0.2, "ms", False),
        Target(f"gateway CPU per relayed token @{n}",
               median_at(main, "gateway", "cpu_us_per_token", "hop"), 40.0, "us", False),
        Target(f"relayed tokens/s @{hi} gateway / direct",
               _median_ratio(raw.high, "gateway", "direct", "tokens_per_s"), 0.97, "x", True),
    ]  # fmt: skip
    by_count = ((str(lo), raw.light), (str(n), main), (str(hi), raw.high))
    summary = {label: _summary(rows) for label, rows in by_count}
    trials = {f"trials_{label}": rows for label, rows in by_count}
    return {"summary": summary, **trials}, targets


def describe(r: Row) -> str:
    cpu = r["cpu_us_per_token"]
    hop = f"  hop {cpu['hop']:5.1f} us/tok" if "hop" in cpu else ""
    return (f"{r['tokens_per_s']:>8.0f} tok/s ttft p50 {r['ttft_p50_ms']:6.2f} ms  gap p50 "
            f"{r['gap_p50_ms']:5.2f} ms p99 {r['gap_p99_ms']:6.2f} ms  msg/tok "
            f"{r['messages_per_token']:.3f}{hop}  worker {cpu['worker']:5.1f} us/tok  "
            f"errors {r['errors']}")  # fmt: skip


def render(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["FakeBackend worker (simulated timing); medians over trials:"]
    for label, arms in summary.items():
        for arm, s in arms.items():
            hop = s.get("hop_cpu_us_per_token")
            lines.append(
                f"  {label:>3} streams {arm:<8} {s['tokens_per_s']:>8.0f} tok/s  ttft p50 "
                f"{s['ttft_p50_ms']:.2f} ms  gap p50 {s['gap_p50_ms']:.3f} ms  msg/tok "
                f"{s['messages_per_token']:.3f}"
                + (f"  hop CPU {hop:.1f} us/tok" if hop is not None else "")
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_relay", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter trials")
    ap.add_argument("--trials", type=int, default=Config.trials)
    ap.add_argument("--window", type=float, default=Config.window_s, help="seconds per arm")
    ap.add_argument("--warmup", type=float, default=Config.warmup_s, help="before each window")
    ap.add_argument("--streams", type=int, default=Config.streams)
    ap.add_argument("--streams-high", type=int, default=Config.streams_high)
    ap.add_argument("--streams-light", type=int, default=Config.streams_light,
                    help="light-load reference (no targets)")  # fmt: skip
    ap.add_argument("--no-proxy", action="store_true", help="skip the bare-proxy reference")
    ap.add_argument("--pin", choices=("none", "split"), default="none")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cfg = Config(a.trials, a.window, a.warmup, a.streams, a.streams_high, a.streams_light,
                 not a.no_proxy, a.pin)  # fmt: skip
    return (cfg.quickened() if a.quick else cfg), a.out


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    import uvloop

    raw = uvloop.run(measure(cfg))
    parts, targets = analyze(raw, cfg)
    print()
    print(render(parts["summary"]))
    config = {"model": MODEL, "per_token_ms": PER_TOKEN_MS, "per_request_ms": PER_REQUEST_MS,
              "max_tokens": MAX_TOKENS, "slots": SLOTS, "capacity": CAPACITY, **asdict(cfg),
              "pinning": raw.pinning}  # fmt: skip
    doc = {"benchmark": "stream_relay", "backend": "FakeBackend (simulated timing, no model)",
           "quick": cfg.quick, "config": config, "machine": raw.machine} | parts  # fmt: skip
    finish(doc, targets, results_path(out, "stream_relay.quick" if cfg.quick else "stream_relay"))


if __name__ == "__main__":
    main()
