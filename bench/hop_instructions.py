"""Instructions per request of a hop (gateway or bare proxy), counted by valgrind's
callgrind: the same fixed number of calls through each arm, instrumentation switched on
only around them. Instruction counts do not depend on what else the machine runs, so
the small differences that telemetry or a refactor make (a few percent) can be told
apart from noise, which the CPU-seconds benchmarks on this shared 2-core machine cannot
do (their arms move by +-15% between trials). Instructions are not cycles: this measures
the work the hop does, not cache or scheduling effects (gateway_overhead does that).

Arms: the bare proxy, the gateway with telemetry off, with metrics, with traces (exported
to an OTLP sink in this process) sampling no call and every call, projected to 1%;
`--baseline-tree DIR` adds the gateway of another checkout (e.g. `git worktree add
/tmp/base <commit>`).

    python -m bench.hop_instructions                 # Infer, 1,000 calls per arm
    python -m bench.hop_instructions --method generate   # Generate, 16 tokens per call
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench import callgrind
from bench.procs import Mesh, fake_args, local_address, repo_env
from bench.report import ROOT, Target, finish, machine, results_path
from bench.telemetry_overhead import otlp_sink
from bench.unary_load import INFER, MODEL, infer_payload, infer_probe
from meshserve.launch import Child, launch, meshserve_argv, module_argv, wait_until_serving
from meshserve.v1 import inference_pb2

GENERATE = "/meshserve.v1.Inference/Generate"
GEN_MODEL = "gen"
TOKENS = 16
EXPORT_TAIL_S = 2.5  # after the calls: their spans' export is part of their cost
# name: (program, metrics, trace sample ratio; None: tracing off). Traces are measured
# with no call sampled and with every call sampled: the cost at any ratio r is then
# c0 + r (c1 - c0), without the sampling noise of counting a handful of sampled calls.
ARMS: dict[str, tuple[str, bool, float | None]] = {
    "proxy": ("proxy", False, None),
    "off": ("gateway", False, None),
    "metrics": ("gateway", True, None),
    "traces0": ("gateway", False, 0.0),
    "traces100": ("gateway", False, 1.0),
}


@dataclass(frozen=True)
class Config:
    method: str = "infer"  # or "generate"
    requests: int = 1000
    warmup: int = 200
    concurrency: int = 8
    trace_ratio: float = 0.01  # the ratio the traces figure is projected to
    baseline_tree: Path | None = None
    arms: tuple[str, ...] = tuple(ARMS)
    idle_s: float = 3.0


def _hop_argv(program: str, address: str, etcd: str, upstream: str, metrics: bool) -> list[str]:
    if program == "proxy":
        return module_argv("bench.proxy", "--listen", address, "--upstream", upstream)
    argv = meshserve_argv("--log-level", "warning", "gateway", "--listen", address)
    return [*argv, "--etcd", etcd, *(["--metrics-port", "0"] if metrics else [])]


async def _calls(target: str, cfg: Config, n: int) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        if cfg.method == "infer":
            infer = ch.unary_unary(INFER)
            payload = infer_payload(0.0)

            async def one() -> None:
                await infer(payload, timeout=60)
        else:
            gen = ch.unary_stream(GENERATE)
            req = inference_pb2.GenerateRequest(
                model=GEN_MODEL,
                prompt="x",
                sampling=inference_pb2.SamplingParams(max_tokens=TOKENS, ignore_eos=True),
            ).SerializeToString()

            async def one() -> None:
                async for _ in gen(req, timeout=60):
                    pass

        async def caller(k: int) -> None:
            for _ in range(k):
                await one()

        per = n // cfg.concurrency
        await asyncio.gather(*(caller(per) for _ in range(cfg.concurrency)))


async def measure_arm(
    mesh: Mesh, cfg: Config, name: str, etcd: str, upstream: str, sink: str
) -> dict[str, Any]:
    program, metrics, traces = ARMS.get(name, ("gateway", False, None))
    address, out = local_address(), mesh.log_dir / f"callgrind.{name}.out"
    env = {**repo_env()}
    cwd = ROOT
    if traces is not None:
        env |= {"MESHSERVE_OTLP_ENDPOINT": sink, "MESHSERVE_TRACE_SAMPLE_RATIO": str(traces)}
        # Export every 2 s instead of 5 s (the SDK default): inside the window, in batches.
        env["OTEL_BSP_SCHEDULE_DELAY"] = "2000"
    if name == "baseline" and cfg.baseline_tree is not None:
        env["PYTHONPATH"], cwd = str(cfg.baseline_tree), cfg.baseline_tree
    command = callgrind.argv(out, _hop_argv(program, address, etcd, upstream, metrics))
    child: Child = launch(
        name, command, mesh.log_dir / f"{name}.log", address=address, env=env, cwd=cwd
    )
    mesh.procs.append(child)
    await wait_until_serving(child, infer_probe, timeout_s=180)
    await _calls(address, cfg, cfg.warmup)
    await asyncio.sleep(EXPORT_TAIL_S)  # the warm-up's spans exported: the channel is up
    counted = await callgrind.count(
        child,
        out,
        lambda: _calls(address, cfg, cfg.requests),
        idle_s=cfg.idle_s,
        tail_s=EXPORT_TAIL_S,  # the calls' last spans exported (counted)
    )
    per = counted.per(cfg.requests)
    unit = per / TOKENS if cfg.method == "generate" else per
    print(
        f"  {name:9s} {per:12,.0f} instructions per call ({unit:,.0f} per "
        f"{'token' if cfg.method == 'generate' else 'call'}; {counted.total / cfg.requests:,.0f} "
        f"before taking off {counted.idle_per_s:,.0f}/s of background)",
        flush=True,
    )
    return {
        "instructions": counted.total,
        "idle_per_s": counted.idle_per_s,
        "calls_s": counted.seconds,
        "per_call": per,
        "per_unit": unit,
    }


async def measure(cfg: Config) -> dict[str, Any]:
    if not callgrind.available():
        raise SystemExit("needs valgrind (Debian package valgrind)")
    load0 = os.getloadavg()
    mesh = Mesh(Path(tempfile.mkdtemp(prefix="meshserve-bench-instr-")))
    arms = [*cfg.arms, *(["baseline"] if cfg.baseline_tree else [])]
    results: dict[str, Any] = {}
    try:
        async with otlp_sink() as (_sink, sink):
            etcd = await mesh.start_etcd()
            models = [f"{MODEL}:infer", GEN_MODEL]
            opts = {"per_request_ms": "0", "per_token_ms": "0.5", "slots": "64"}
            worker = mesh.worker(etcd, fake_args(models, opts, 1024))
            await wait_until_serving(worker, infer_probe)
            for name in arms:
                results[name] = await measure_arm(mesh, cfg, name, etcd, worker.address, sink)
    finally:
        await mesh.close()
    return {"arms": results, "machine": machine(load0)}


def analyze(
    arms: dict[str, dict[str, Any]], trace_ratio: float = 0.01
) -> tuple[dict[str, float], list[Target]]:
    """Ratios of instructions per call between arms; traces projected to `trace_ratio`."""
    per = {name: r["per_call"] for name, r in arms.items()}
    if "traces0" in per and "traces100" in per:
        per["traces"] = per["traces0"] + trace_ratio * (per["traces100"] - per["traces0"])
    pairs = {
        "off/proxy": ("off", "proxy"),
        "metrics/off": ("metrics", "off"),
        "traces/off": ("traces", "off"),
        "traces0/off": ("traces0", "off"),
        "traces100/off": ("traces100", "off"),
        "metrics/proxy": ("metrics", "proxy"),
        "off/baseline": ("off", "baseline"),
    }
    ratios = {k: per[a] / per[b] for k, (a, b) in pairs.items() if a in per and b in per}
    targets = []
    if "metrics/off" in ratios:
        targets.append(
            Target("instructions, metrics on / off", ratios["metrics/off"], 1.05, "x", False)
        )
    if "traces/off" in ratios:
        targets.append(
            Target("instructions, traces at 1% / off", ratios["traces/off"], 1.03, "x", False)
        )
    return ratios, targets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hop_instructions", description=__doc__)
    ap.add_argument("--method", choices=("infer", "generate"), default="infer")
    ap.add_argument("--requests", type=int, default=Config.requests)
    ap.add_argument("--baseline-tree", type=Path)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument(
        "--trace-ratio", type=float, default=Config.trace_ratio, help="traces projected to"
    )
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cfg = Config(
        a.method,
        a.requests,
        trace_ratio=a.trace_ratio,
        baseline_tree=a.baseline_tree,
        arms=tuple(a.arms),
    )
    raw = asyncio.run(measure(cfg))
    ratios, targets = analyze(raw["arms"], cfg.trace_ratio)
    print("ratios:", {k: round(v, 4) for k, v in ratios.items()})
    config = asdict(cfg) | {"baseline_tree": str(cfg.baseline_tree or "")}
    doc = {
        "benchmark": "hop_instructions",
        "config": config,
        "machine": raw["machine"],
        "arms": raw["arms"],
        "ratios": ratios,
    }
    finish(doc, targets, results_path(a.out, f"hop_instructions.{cfg.method}"))


if __name__ == "__main__":
    main()
