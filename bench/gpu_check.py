"""GPU check (issue 4): the torch backend behind a worker and the gateway vs in-process
references, on a 200M-parameter Llama-shaped model (random weights, made here), for 1, 8
and 32 concurrent streams. One script, under 6 minutes on one H100/H200:

 1. makes the model (bench/gpu_model.py) and starts etcd, a gateway and one worker on
    cuda:0 serving it (bench/gpu_mesh.py; they load while step 2 compiles);
 2. prepares the in-process references (bench/gpu_refs.py): `generate` with a static cache
    (compiled by transformers) and a bare loop over the model's forward compiled with
    torch.compile(mode="reduce-overhead") on a StaticCache, at batch 1 and 32;
 3. once the worker is up (idle), measures the references, then the mesh: N streams
    (greedy, ignore_eos, max_tokens 128) to the worker directly and through the gateway;
 4. prints the table and the targets, writes gpu_check.json and gpu_check.txt (+ the
    processes' logs) to --out ($OUT if set, else bench/results/).

A time guard keeps it within --budget seconds: phases that no longer fit are skipped, and
a watchdog writes whatever was measured and exits at --budget + 20 s.

    python -m bench.gpu_check                       # on a CUDA machine
    python -m bench.gpu_check --device cpu --small  # the CPU smoke run (tiny model, eager)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bench.gpu_report import table
from bench.report import write_results

MESH_RESERVE_S = 75.0  # kept for measuring the references and the mesh
COMPILE_EST_S = 25.0  # one more reference's preparation must fit before the reserve


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.counts: list[int] = sorted({int(c) for c in args.counts.split(",")})
        self.lock = threading.Lock()
        self.finished = False
        self.procs: Any = None  # gpu_mesh.MeshProcs once started
        self.work = Path(tempfile.mkdtemp(prefix="meshserve-gpu-check-"))
        self.result: dict[str, Any] = {
            "benchmark": "gpu_check",
            "complete": False,
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": {},
            "model": {},
            "timeline_s": {},
            "references": {},
            "mesh": {},
            "errors": [],
            "skipped": [],
        }

    # -- clock and output -----------------------------------------------------------------

    def log(self, msg: str) -> None:
        now = time.strftime("%H:%M:%S")
        print(f"[gpu_check {now} +{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def left(self) -> float:
        left: float = self.deadline - time.monotonic()
        return left

    def mark(self, phase: str) -> None:
        self.result["timeline_s"][phase] = round(time.monotonic() - self.t0, 1)

    def error(self, where: str, exc: BaseException) -> None:
        msg = f"{where}: {type(exc).__name__}: {exc}"[:2000]
        self.result["errors"].append(msg)
        tb = "".join(traceback.format_exception(exc))[-6000:]
        self.result.setdefault("tracebacks", []).append(tb)
        self.log(f"ERROR {msg}\n{tb}")

    def finish(self, stopped_by: str | None) -> None:
        """Print the table and write the files, once (main thread or watchdog)."""
        with self.lock:
            if self.finished:
                return
            self.finished = True
        try:
            res = copy.deepcopy(self.result)
        except RuntimeError:  # changed while copying (watchdog): take it as it is
            res = self.result
        res["complete"] = stopped_by is None
        if stopped_by:
            res["stopped_by"] = stopped_by
        res["total_s"] = round(time.monotonic() - self.t0, 1)
        from bench.gpu_report import checks

        res["targets"] = [c.as_dict() for c in checks(res, max(self.counts))]
        text = table(res, self.counts)
        print("\n" + text + "\n", flush=True)
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        stem = "gpu_check_small" if self.args.small else "gpu_check"
        write_results(out / f"{stem}.json", res)
        (out / f"{stem}.txt").write_text(text + "\n")
        self.log(f"wrote {out / (stem + '.json')} and {stem}.txt")

    def copy_logs(self) -> None:
        dest = self.args.out / ("gpu_check_small_logs" if self.args.small else "gpu_check_logs")
        logs = sorted((self.work / "logs").glob("*.log")) if (self.work / "logs").is_dir() else []
        for f in logs:
            dest.mkdir(parents=True, exist_ok=True)
            data = f.read_bytes()
            (dest / f.name).write_bytes(data[-1_000_000:])

    def watchdog(self, reason: str = "time guard (hard limit)") -> None:
        self.log(f"{reason.upper()}: writing partial results")
        try:
            self.finish(reason)
            if self.procs is not None:
                self.procs.kill_now()
            self.copy_logs()
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            os._exit(3)

    # -- phases -----------------------------------------------------------------------------

    def run(self) -> int:
        guard = threading.Timer(self.args.budget + 20, self.watchdog)
        guard.daemon = True
        guard.start()
        # Killed from outside (e.g. `timeout`): still write what was measured, stop children.
        signal.signal(signal.SIGTERM, lambda _s, _f: self.watchdog("terminated (SIGTERM)"))
        try:
            self._run()
        except Exception as exc:
            self.error("run", exc)
        finally:
            self.mark("measured")
            self.finish(None)  # ran to the end (errors, if any, are listed)
            self._close()
            self.copy_logs()
            guard.cancel()
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        return 0 if not self.result["errors"] else 1

    def _close(self) -> None:
        if self.procs is not None:
            from bench.gpu_mesh import MeshProcs

            procs: MeshProcs = self.procs
            try:
                asyncio.run(asyncio.wait_for(procs.mesh.close(), 30))
            except Exception as exc:
                self.error("stopping the mesh", exc)
                procs.kill_now()

    def _run(self) -> None:
        import grpc
        import torch
        import transformers

        from bench.gpu_mesh import start_mesh
        from bench.gpu_model import GPU_SHAPE, SMALL_SHAPE, build_model, make_prompts
        from bench.gpu_refs import BareLoop, StaticGenerate

        args = self.args
        device = torch.device(args.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
            # As the worker does: cuDNN SDPA re-plans per KV length (pathological in eager).
            torch.backends.cuda.enable_cudnn_sdp(False)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        self.result["machine"] = {
            "device_name": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "grpcio": grpc.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        self.log(f"device {name}; torch {torch.__version__}, transformers "
                 f"{transformers.__version__}, Python {platform.python_version()}, grpcio "
                 f"{grpc.__version__}; budget {args.budget:.0f} s")  # fmt: skip
        compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        self.result["compiled"] = compile_on
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        shape = SMALL_SHAPE if args.small else GPU_SHAPE
        options = {"engine": args.engine, "max_cache_len": str(args.max_cache_len),
                   "cuda_graphs": "auto" if device.type == "cuda" else "off"}  # fmt: skip
        for item in args.model_option or ():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--model-option wants KEY=VALUE, got {item!r}")
            options[key.strip()] = value.strip()
        built = build_model(self.work / "models", shape, device, dtype,
                            max_concurrency=args.max_concurrency, options=options,
                            progress=self.log)  # fmt: skip
        self.result["model"] = built.info()
        self.mark("model_built")

        (self.work / "logs").mkdir(exist_ok=True)
        worker_device = "cuda:0" if device.type == "cuda" else "cpu"
        self.procs = asyncio.run(start_mesh(self.work / "logs", built.models_dir,
                                            built.spec.name, worker_device))  # fmt: skip
        self.log(f"mesh starting: etcd up, worker ({worker_device}) and gateway launched")
        self.mark("mesh_launched")

        pad = int(built.model.generation_config.pad_token_id)
        refs: list[tuple[int, Any]] = []
        # Largest batch first: the targets need the bare loop's batch-32 figures.
        ref_batches = list(dict.fromkeys((max(self.counts), min(self.counts))))
        for cls in (BareLoop, StaticGenerate):
            # A bare loop that does not compile as one graph gets a second try with breaks.
            tries: list[dict[str, Any]] = (
                [{"pad_id": pad}]
                if cls is StaticGenerate
                else [{"fullgraph": True}, {"fullgraph": False}]
                if compile_on
                else [{}]
            )
            for b in ref_batches:
                prompts = make_prompts(built, b, args.prompt_len, seed=b)
                for i, kw in enumerate(tries):
                    label = f"{cls.name} batch {b}" + (f" {kw}" if i else "")
                    if self.left() < MESH_RESERVE_S + COMPILE_EST_S:
                        self.result["skipped"].append(f"{label}: time guard")
                        self.log(f"skip {label} (time guard: {self.left():.0f} s left)")
                        break
                    try:
                        ref = cls(built.model, prompts, args.max_tokens, device,
                                  compile_step=compile_on, **kw)  # fmt: skip
                        how = "compiling" if ref.compiled else "eager"
                        self.log(f"preparing {label} ({how})")
                        self.log(f"prepared {label} in {ref.prepare():.1f} s")
                        refs.append((b, ref))
                        break
                    except Exception as exc:
                        self.error(f"preparing {label}", exc)
        self.mark("references_prepared")

        def prompts_for(n: int, seed: int) -> list[list[int]]:
            return make_prompts(built, n, args.prompt_len, seed)

        asyncio.run(self._measure(refs, built.spec.name, prompts_for))

    def _measure_refs(self, refs: list[tuple[int, Any]]) -> None:
        for b, ref in refs:
            if self.left() < 20:
                self.result["skipped"].append(f"measuring {ref.name} batch {b}: time guard")
                continue
            try:
                r = ref.measure(self.args.ref_runs)
            except Exception as exc:
                self.error(f"measuring {ref.name} batch {b}", exc)
                continue
            row = r.as_dict() | {"ttft_p50_ms": r.ttft_ms}
            self.result["references"].setdefault(ref.name, {})[str(b)] = row
            self.log(f"{ref.name:<20} batch {b:>2}: {r.ms_per_step:7.3f} ms/step "
                     f"{r.tokens_per_s:9.1f} tok/s  TTFT {r.ttft_ms:7.2f} ms")  # fmt: skip

    async def _measure(self, refs: list[tuple[int, Any]], model: str, prompts_for: Any) -> None:
        from bench.gpu_mesh import MeshProcs, Rounds, describe_models, measure, wait_serving

        procs: MeshProcs = self.procs
        arms: dict[str, str] = {}
        for arm, proc, most in (("direct", procs.worker, 1e9), ("gateway", procs.gateway, 40.0)):
            if arm == "gateway" and not arms:
                break
            wait_s = min(most, max(5.0, self.left() - 45))
            self.log(f"waiting until the {proc.name} serves {model} (up to {wait_s:.0f} s)")
            try:
                await wait_serving(proc, model, wait_s)
                arms[arm] = proc.address
                self.log(f"the {proc.name} at {proc.address} serves {model}")
                if arm == "direct":
                    try:
                        desc = await describe_models(proc.address)
                    except Exception as exc:
                        desc = f"ListModels failed: {exc}"
                    self.result["worker_models"] = desc
                    self.log(f"worker ListModels: {desc}")
            except Exception as exc:
                self.error(f"{proc.name} not serving {model}", exc)
                for p in (procs.worker, procs.gateway):
                    self.log(f"{p.name} log tail:\n{p.log_tail(3000)}")
        self.mark("mesh_ready")
        self._measure_refs(refs)  # the worker is idle now: the device is ours
        self.mark("references_measured")
        if not arms:
            return
        order = [max(self.counts), *[n for n in self.counts if n != max(self.counts)]]
        rounds = Rounds(self.args.clients, model)
        try:
            await measure(
                rounds,
                arms,
                order,
                prompts_for,
                max_tokens=self.args.max_tokens,
                trials=self.args.trials,
                deadline_mono=self.deadline - 12,
                round_cap_s=self.args.round_cap,
                log=self.log,
                store=self.result["mesh"],
            )
        except Exception as exc:
            self.error("mesh measurement", exc)
        finally:
            rounds.close()


def _default_out() -> Path:
    env = os.environ.get("OUT")
    return Path(env) if env else Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", default="cuda", help="cuda (cuda:0) or cpu")
    ap.add_argument("--small", action="store_true", help="tiny model and few tokens (CPU smoke)")
    ap.add_argument("--out", type=Path, default=_default_out())
    ap.add_argument("--budget", type=float, default=315.0, help="soft time limit, seconds")
    ap.add_argument("--counts", default="1,8,32", help="concurrent streams, comma-separated")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--trials", type=int, help="rounds per arm and stream count")
    ap.add_argument("--ref-runs", type=int, default=3, help="timed runs per reference")
    ap.add_argument("--clients", type=int, default=2, help="load-generator processes")
    ap.add_argument("--round-cap", type=float, default=30.0, help="max seconds per round")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="compile the references (auto: on CUDA only)")  # fmt: skip
    ap.add_argument("--engine", default="batched", help="model option `engine`")
    ap.add_argument("--max-cache-len", type=int, default=512, help="model option")
    ap.add_argument("--max-concurrency", type=int, default=32, help="model batch slots")
    ap.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                    help="more model options, e.g. compile=inductor (repeatable)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (model, logs)")
    args = ap.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 16 if args.small else 128
    if args.max_tokens < 8:
        ap.error("--max-tokens must be at least 8")
    if args.trials is None:
        args.trials = 2 if args.small else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code = Check(args).run()
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
