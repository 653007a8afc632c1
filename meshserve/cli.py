"""The `meshserve` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc

from meshserve.config import GatewaySettings, WorkerSettings, default_models_dir

DEFAULT_TARGET = "127.0.0.1:50051"


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:  # uvloop is optional on platforms without wheels
        result = asyncio.run(coro)
    return int(result or 0)


async def _gateway(args: argparse.Namespace) -> int:
    from gateway.server import Gateway

    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = args.listen
    if args.etcd:
        overrides["etcd"] = args.etcd
    if args.policy:
        overrides["policy"] = args.policy
    overrides.update(_metrics_overrides(args))
    await Gateway(GatewaySettings(**overrides)).run()
    return 0


def _metrics_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.metrics_port is not None:  # 0 is a choice too: any free port
        out["metrics_port"] = args.metrics_port
    if args.metrics_host:
        out["metrics_host"] = args.metrics_host
    return out


def _add_metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port (0: any free port; default: off)",
    )
    p.add_argument("--metrics-host", help="host the metrics port binds (default: --listen's)")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


async def _worker(args: argparse.Namespace) -> int:
    from worker.lifecycle import Worker

    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "listen": args.listen,
            "advertise": args.advertise,
            "device": args.device,
            "models": args.model,
            "models_dir": args.models_dir,
            "etcd": args.etcd,
            "worker_id": args.worker_id,
            "capacity": args.capacity,
            "torch_threads": args.torch_threads,
            "fake_models": args.fake,
            "fake_options": dict(_key_value(o) for o in args.fake_option or ()),
            "labels": dict(_key_value(o) for o in args.label or ()),
        }.items()
        if v
    }
    overrides.update(_metrics_overrides(args))
    await Worker(WorkerSettings(**overrides)).run()
    return 0


async def _generate(args: argparse.Namespace) -> int:
    from meshserve.client import MeshClient

    async with MeshClient(args.target) as client:
        try:
            async for msg in client.generate(
                args.model,
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                seed=args.seed,
                stop=args.stop or (),
                timeout=args.timeout,
            ):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    from meshserve.v1 import inference_pb2

                    reason = inference_pb2.FinishReason.Name(msg.finish_reason)
                    sys.stdout.write("\n")
                    print(
                        f"[{reason.removeprefix('FINISH_REASON_').lower()}: "
                        f"{msg.usage.prompt_tokens} prompt + "
                        f"{msg.usage.completion_tokens} completion tokens]",
                        file=sys.stderr,
                    )
        except grpc.aio.AioRpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


async def _embed(args: argparse.Namespace) -> int:
    from meshserve.client import MeshClient

    async with MeshClient(args.target) as client:
        try:
            emb = await client.embed(args.model, args.texts, timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for text, row in zip(args.texts, emb, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in row[:4])
        print(f"{text[:40]!r}: dim={row.shape[0]} [{head}, ...]")
    return 0


async def _list(args: argparse.Namespace) -> int:
    from meshserve.client import MeshClient
    from meshserve.v1 import types_pb2

    async with MeshClient(args.target) as client:
        try:
            resp = await client.list_models(timeout=args.timeout)
        except grpc.aio.AioRpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for m in resp.models:
        state = types_pb2.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower()
        print(f"{m.name}  {state}  ({m.backend})")
        for r in m.replicas:
            rstate = types_pb2.ModelState.Name(r.state).removeprefix("MODEL_STATE_").lower()
            print(f"    {r.worker_id}  {r.address}  {r.device}  {rstate}  {r.error}".rstrip())
    return 0


async def _alias(args: argparse.Namespace) -> int:
    from meshserve.errors import MeshError
    from registry.aliases import AliasRecord, parse_targets
    from registry.etcd import EtcdRegistry

    async with EtcdRegistry(args.etcd or ["127.0.0.1:2379"]) as reg:
        try:
            if args.alias_command == "set":
                alias = AliasRecord(args.name, parse_targets(args.targets))
                await reg.put_alias(alias)
                total = sum(w for _, w in alias.targets)
                split = ", ".join(f"{m} {100 * w / total:.1f}%" for m, w in alias.targets)
                print(f"{alias.name} -> {split}")
            elif args.alias_command == "delete":
                if not await reg.delete_alias(args.name):
                    print(f"no alias {args.name!r}", file=sys.stderr)
                    return 1
            else:
                _, aliases, _ = await reg.list_registry()
                for a in sorted(aliases.values(), key=lambda a: a.name):
                    print(a.name, " ".join(f"{m}={w:g}" for m, w in a.targets))
        except MeshError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    return 0


def _make_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from meshserve.demo import make_demo

    console = Console(stderr=True)
    with console.status("making demo models") as st:
        specs = make_demo(args.models_dir, force=args.force, progress=st.update)
    for spec in specs:
        console.print(f"[green]ok[/] {spec.name} ({spec.kind.value}) in {args.models_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("MESHSERVE_LOG_LEVEL", "info"))
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("MESHSERVE_LOG_FORMAT", "text"),
        help="json: one JSON object per line, with request_id and trace_id",
    )
    p.add_argument(
        "--log-prompts",
        action="store_true",
        default=os.environ.get("MESHSERVE_LOG_PROMPTS", "") == "1",
        help="DEBUGGING ONLY: log prompts and outputs (never on by default)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local mesh: etcd, a gateway and N CPU workers")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--port", type=int, default=50051, help="gateway port")
    up.add_argument("--etcd-port", type=int, default=0, help="etcd client port (0: free)")
    up.add_argument("--models-dir", type=Path, default=default_models_dir())
    up.add_argument("--model", action="append", help="model to serve (repeatable)")
    up.add_argument("--data-dir", type=Path, help="etcd data and logs (default: temp dir)")

    gw = sub.add_parser("gateway", help="run one gateway (env: MESHSERVE_GATEWAY_*)")
    gw.add_argument("--listen")
    gw.add_argument("--etcd", action="append", help="etcd endpoint host:port (repeatable)")
    gw.add_argument("--policy", help="routing policy (default latency_capacity)")
    _add_metrics_flags(gw)

    wk = sub.add_parser("worker", help="run one worker (env: MESHSERVE_WORKER_*)")
    wk.add_argument("--listen")
    wk.add_argument("--advertise", help="host:port the gateways dial")
    wk.add_argument("--device", help="cpu, cuda:N or mps")
    wk.add_argument("--model", action="append", help="model to serve (repeatable)")
    wk.add_argument("--models-dir", type=Path)
    wk.add_argument("--etcd", action="append", help="etcd endpoint host:port (repeatable)")
    wk.add_argument("--worker-id")
    wk.add_argument("--capacity", type=int)
    wk.add_argument("--torch-threads", type=int)
    _add_metrics_flags(wk)
    wk.add_argument(
        "--label",
        action="append",
        metavar="KEY=VALUE",
        help="label in the worker record (repeatable); `weight` is the static capacity "
        "weight capacity-weighted policies use (e.g. relative speed)",
    )
    wk.add_argument(
        "--fake",
        action="append",
        metavar="MODEL",
        help="serve MODEL[:generate|infer] with the FakeBackend (simulated timing, no weights; "
        "repeatable)",
    )
    wk.add_argument(
        "--fake-option",
        action="append",
        metavar="KEY=VALUE",
        help="FakeBackend option: per_request_ms, per_token_ms, distribution, sigma, slots, "
        "speed, error_rate, hang_rate, seed, max_queue",
    )

    for name, hlp in (
        ("generate", "stream a generation"),
        ("embed", "embed texts"),
        ("list", "list models"),
    ):
        c = sub.add_parser(name, help=hlp)
        c.add_argument("--target", default=os.environ.get("MESHSERVE_TARGET", DEFAULT_TARGET))
        c.add_argument("--timeout", type=float, default=60.0)
        if name == "generate":
            c.add_argument("--model", default="tiny-llama")
            c.add_argument("--max-tokens", type=int, default=32)
            c.add_argument("--temperature", type=float)
            c.add_argument("--seed", type=int)
            c.add_argument("--stop", action="append")
            c.add_argument("prompt")
        elif name == "embed":
            c.add_argument("--model", default="minilm")
            c.add_argument("texts", nargs="+")

    al = sub.add_parser("alias", help="model aliases: weighted traffic splits, live in etcd")
    asub = al.add_subparsers(dest="alias_command", required=True)
    for name, hlp in (("set", "create or change"), ("delete", "remove"), ("list", "show all")):
        c = asub.add_parser(name, help=f"{hlp} an alias")
        c.add_argument("--etcd", action="append", help="etcd endpoint host:port (repeatable)")
        if name != "list":
            c.add_argument("name")
        if name == "set":
            c.add_argument("targets", nargs="+", metavar="MODEL=WEIGHT")

    from meshserve import ctl

    ctl.add_parser(sub, os.environ.get("MESHSERVE_TARGET", DEFAULT_TARGET))

    models = sub.add_parser("models", help="manage the local model repository")
    msub = models.add_subparsers(dest="models_command", required=True)
    md = msub.add_parser("make-demo", help="build tiny-llama and register minilm locally")
    md.add_argument("--models-dir", type=Path, default=default_models_dir())
    md.add_argument("--force", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from meshserve import logs

    logs.setup(args.log_level, args.log_format, log_prompts=args.log_prompts)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "up":
        from meshserve.up import run_up

        return _run(run_up(args))
    if args.command == "models":
        return _make_demo(args)
    if args.command == "ctl":
        from meshserve import ctl

        return _run(ctl.run(args))
    handlers = {
        "gateway": _gateway,
        "worker": _worker,
        "generate": _generate,
        "embed": _embed,
        "list": _list,
        "alias": _alias,
    }
    return _run(handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
