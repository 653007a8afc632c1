"""What metrics and traces cost the gateway: the same gateway with telemetry off, with
Prometheus metrics on, with traces at 1% of calls (exported over OTLP to a sink in this
process), and with both, each a process of its own in front of one FakeBackend worker.

Each trial sends every arm the same open-loop Poisson schedule at a fixed rate (the arm
order rotating per trial): the hop's CPU time per request (utime + stime over the window /
requests) and its latency. Ratios and differences to `off` are taken per trial, then the
median over trials. `--baseline-tree DIR` adds the gateway of another checkout (telemetry
off) as one more arm: the before/after of a change, measured in one run.

    python -m bench.telemetry_overhead            # 9 trials x 3 s per arm
    python -m bench.telemetry_overhead --quick    # 5 trials x 2 s
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.loadgen import LoadGen
from bench.procs import Mesh, fake_args, local_address
from bench.report import Target, finish, machine, results_path
from bench.stats import median, median_at
from bench.unary_load import MODEL, infer_payload, infer_probe
from meshserve.launch import Child, wait_until_serving

JOB = "bench.unary_load"
WORKER_OPTIONS = {"per_request_ms": "5", "distribution": "fixed", "slots": "256"}
ARMS: dict[str, tuple[bool, bool]] = {  # name: (metrics, traces)
    "off": (False, False),
    "metrics": (True, False),
    "traces": (False, True),
    "both": (True, True),
}
Row = dict[str, Any]


@dataclass(frozen=True)
class Config:
    trials: int = 9
    window_s: float = 3.0
    warmup_s: float = 0.5
    rate_rps: float = 500.0  # about 40% of a gateway's ceiling here: CPU per request at a
    # fixed rate varies far less between runs than at saturation
    trace_ratio: float = 0.01
    baseline_tree: Path | None = None
    quick: bool = False

    def quickened(self) -> Config:
        return replace(self, trials=5, window_s=2.0, quick=True)


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP receiver that counts spans and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.asynccontextmanager
async def otlp_sink() -> AsyncIterator[tuple[_Sink, str]]:
    sink, server = _Sink(), grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    address = local_address()
    server.add_insecure_port(address)
    await server.start()
    try:
        yield sink, address
    finally:
        await server.stop(None)


async def start(mesh: Mesh, cfg: Config, sink: str) -> dict[str, Child]:
    etcd = await mesh.start_etcd()
    worker = mesh.worker(etcd, fake_args([f"{MODEL}:infer"], WORKER_OPTIONS, 1024))
    gateways = {}
    for arm, (metrics, traces) in ARMS.items():
        args = ["--metrics-port", "0"] if metrics else []
        env = {}
        if traces:
            env = {
                "MESHSERVE_OTLP_ENDPOINT": sink,
                "MESHSERVE_TRACE_SAMPLE_RATIO": str(cfg.trace_ratio),
            }
        gateways[arm] = mesh.gateway(etcd, args, name=f"gateway-{arm}", env=env)
    if cfg.baseline_tree is not None:  # telemetry off, the code of another commit
        gateways["baseline"] = mesh.gateway(etcd, name="gateway-baseline", tree=cfg.baseline_tree)
    for p in (worker, *gateways.values()):
        await wait_until_serving(p, infer_probe)
    return gateways


async def fixed_rate_phase(
    mesh: Mesh, gen: LoadGen, hops: dict[str, Child], cfg: Config
) -> list[Row]:
    """Each arm at the same Poisson schedule per trial, the order rotating per trial:
    latency, and the hop's CPU seconds per request over the window."""
    rows: list[Row] = []
    names = list(hops)
    for t in range(cfg.trials):
        row: Row = {"trial": t}
        for arm in names[t % len(names) :] + names[: t % len(names)]:
            hop = hops[arm]
            job = {
                "target": hop.address,
                "payload": infer_payload(None),
                "rate": cfg.rate_rps,
                "seed": 2000 + t,
                "warmup_s": cfg.warmup_s,
                "window_s": cfg.window_s,
                "cpu_pids": [hop.pid],
            }
            r = await gen.run(f"{JOB}:open_loop", job, cfg.window_s + 60)
            mesh.check_alive()
            cpu_us = r["cpu_s"][str(hop.pid)] / max(r["requests"], 1) * 1e6
            row[arm] = {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"],
                        "cpu_us_per_req": cpu_us}  # fmt: skip
        rows.append(row)
        print(f"  trial {t}: " + "  ".join(
            f"{a} {row[a]['cpu_us_per_req']:.0f} us p50 {row[a]['p50_ms']:.2f} ms" for a in names
        ), flush=True)  # fmt: skip
    return rows


async def measure(cfg: Config) -> dict[str, Any]:
    load0 = os.getloadavg()
    mesh = Mesh(Path(tempfile.mkdtemp(prefix="meshserve-bench-telemetry-")))
    gen = LoadGen(None)
    try:
        async with otlp_sink() as (sink, address):
            hops = await start(mesh, cfg, address)
            print(f"{len(hops)} gateways in front of one FakeBackend worker (simulated "
                  f"5 ms calls), {cfg.rate_rps:g} req/s each in turn, {cfg.trials} trials "
                  f"x {cfg.window_s:g} s", flush=True)  # fmt: skip
            rows = await fixed_rate_phase(mesh, gen, hops, cfg)
            await mesh.close()  # the traced gateways flush their spans on the way out
            spans = sink.spans
    finally:
        gen.close()
        await mesh.close()
    return {"trials": rows, "spans_exported": spans, "machine": machine(load0)}


def analyze(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Target]]:
    """Per trial, each arm's CPU per request relative to `off` and its added p50 (same
    schedule); the medians over trials; the targets."""
    rows = raw["trials"]
    arms = [a for a in rows[0] if a != "trial"] if rows else []
    cpu_ratio = {
        a: median(r[a]["cpu_us_per_req"] / r["off"]["cpu_us_per_req"] for r in rows) for a in arms
    }
    added = {a: median(r[a]["p50_ms"] - r["off"]["p50_ms"] for r in rows) for a in arms}
    summary = {
        "cpu_us_per_req": {a: median_at(rows, a, "cpu_us_per_req") for a in arms},
        "p50_ms": {a: median_at(rows, a, "p50_ms") for a in arms},
        "p99_ms": {a: median_at(rows, a, "p99_ms") for a in arms},
        "cpu_ratio_to_off": cpu_ratio,
        "added_p50_ms_over_off": added,
        "spans_exported": raw["spans_exported"],
    }
    targets = [
        Target("CPU per request, metrics on / off", cpu_ratio["metrics"], 1.05, "x", False),
        Target("added p50, metrics on - off", added["metrics"], 0.1, "ms", False),
        Target("CPU per request, traces at 1% / off", cpu_ratio["traces"], 1.03, "x", False),
    ]
    return summary, targets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.telemetry_overhead", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trials", type=int, default=Config.trials)
    ap.add_argument("--window", type=float, default=Config.window_s)
    ap.add_argument("--rate", type=float, default=Config.rate_rps, help="req/s per arm")
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        help="also a gateway from this checkout (e.g. a git worktree of an earlier commit)",
    )
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cfg = Config(trials=a.trials, window_s=a.window, rate_rps=a.rate, baseline_tree=a.baseline_tree)
    cfg = cfg.quickened() if a.quick else cfg
    import uvloop

    raw = uvloop.run(measure(cfg))
    summary, targets = analyze(raw)
    print(f"medians over trials: {summary}")
    config = asdict(cfg) | {"baseline_tree": str(cfg.baseline_tree or "")}
    doc = {
        "benchmark": "telemetry_overhead",
        "quick": cfg.quick,
        "config": config,
        "machine": raw["machine"],
        "summary": summary,
        "trials": raw["trials"],
    }
    finish(
        doc, targets, results_path(a.out, "telemetry_overhead" + (".quick" if cfg.quick else ""))
    )


if __name__ == "__main__":
    main()
