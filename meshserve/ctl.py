"""`meshserve ctl`: operator questions to a gateway (its Admin service), as tables.

meshserve ctl status
meshserve ctl workers
meshserve ctl models
meshserve ctl route-explain --model tiny-llama [--session S] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from meshserve.grpc_server import new_channel
from meshserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    types_pb2,
)


def add_parser(sub: Any, default_target: str) -> None:
    ctl = sub.add_parser("ctl", help="ask a gateway about itself, the fleet and its routing")
    csub = ctl.add_subparsers(dest="ctl_command", required=True)
    for name, hlp in (
        ("status", "the gateway's health and registry view"),
        ("workers", "every worker as this gateway sees it: load, latency, traffic share"),
        ("models", "every model and its replicas"),
        ("route-explain", "where the scheduler would send such a request now, and why"),
    ):
        c = csub.add_parser(name, help=hlp)
        c.add_argument("--target", default=default_target, help="gateway host:port")
        c.add_argument("--timeout", type=float, default=10.0)
        c.add_argument("--json", action="store_true", help="print the response as JSON")
        if name == "route-explain":
            c.add_argument("--model", required=True)
            c.add_argument("--session", default="", help="session id (affinity)")
            c.add_argument("--max-tokens", type=int, default=0)
            c.add_argument("--prompt-tokens", type=int, default=0)
            c.add_argument("--priority", choices=("high", "normal", "low"), default="normal")
            c.add_argument("--policy", default="", help="a policy by name (default: the gateway's)")


def _state(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _status_table(resp: admin_pb2.GetStatusResponse) -> Table:
    t = Table(title="gateway", show_header=False)
    age = resp.registry_view_age_seconds
    for key, value in (
        ("serving", "yes" if resp.serving else "NO"),
        ("detail", resp.detail),
        ("registry", "connected" if resp.registry_connected else f"DOWN: {resp.registry_error}"),
        ("view age", "never" if age < 0 else f"{age:.1f} s"),
        ("workers", str(resp.workers)),
        ("ready models", ", ".join(resp.ready_models) or "none"),
        ("policy", resp.policy),
        ("version", resp.version),
    ):
        t.add_row(key, value)
    return t


def _workers_table(resp: admin_pb2.ListWorkersResponse) -> Table:
    t = Table(title="workers")
    for col in (
        "worker",
        "address",
        "device",
        "state",
        "models",
        "in flight",
        "queue",
        "KV",
        "share",
        "service ms",
        "errors",
    ):
        t.add_column(col)
    for w in resp.workers:
        models = ", ".join(
            f"{m.name}:{_state(types_pb2.ModelState, m.state, 'MODEL_STATE_')}" for m in w.models
        )
        service = ", ".join(f"{m.service_time_seconds * 1000:.1f}" for m in w.models) or "-"
        state = _state(registry_pb2.WorkerState, w.state, "WORKER_STATE_")
        t.add_row(
            w.worker_id,
            w.address,
            w.device,
            state + (" (ejected)" if w.ejected else ""),
            models,
            f"{w.inflight_estimate}/{w.capacity}",
            str(w.queue_depth),
            f"{w.kv_cache_use:.0%}",
            f"{w.traffic_share:.0%}",
            service,
            f"{w.error_rate:.2f}",
        )
    return t


def _models_table(resp: inference_pb2.ListModelsResponse) -> Table:
    t = Table(title="models")
    for col in ("model", "kind", "state", "backend", "replicas"):
        t.add_column(col)
    for m in resp.models:
        replicas = ", ".join(
            f"{r.worker_id}:{_state(types_pb2.ModelState, r.state, 'MODEL_STATE_')}"
            for r in m.replicas
        )
        t.add_row(
            m.name,
            _state(types_pb2.ModelKind, m.kind, "MODEL_KIND_"),
            _state(types_pb2.ModelState, m.state, "MODEL_STATE_"),
            m.backend,
            replicas,
        )
    return t


_INPUTS = (
    "slots",
    "reported_inflight",
    "sent_since_report",
    "queue_depth",
    "service_time",
    "kv_cache_use",
    "error_rate",
)


def _explain_table(resp: admin_pb2.ExplainRouteResponse) -> Table:
    t = Table(title=f"{resp.model} via {resp.policy}: would go to {resp.chosen_worker or 'none'}")
    t.add_column("rank")
    t.add_column("worker")
    t.add_column("predicted ms")
    t.add_column("inputs")
    t.add_column("scores")
    t.add_column("notes")
    for c in resp.candidates:
        inputs = " ".join(f"{k}={c.inputs[k]:g}" for k in _INPUTS if k in c.inputs)
        scores = " ".join(f"{k}={v:.2f}" for k, v in sorted(c.scores.items()))
        notes = [n for n, on in (("ejected", c.ejected), ("too short", c.too_short)) if on]
        if c.filtered_by:
            notes.append(f"filtered by {c.filtered_by}")
        t.add_row(
            "-" if c.rank < 0 else str(c.rank),
            c.worker_id,
            f"{c.predicted_completion_seconds * 1000:.2f}",
            inputs,
            scores,
            ", ".join(notes),
        )
    return t


async def run(args: argparse.Namespace) -> int:
    console = Console()
    async with new_channel(args.target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        try:
            resp: Any
            if args.ctl_command == "status":
                resp = await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=args.timeout)
                table = _status_table(resp)
            elif args.ctl_command == "workers":
                req = admin_pb2.ListWorkersRequest()
                resp = await admin.ListWorkers(req, timeout=args.timeout)
                table = _workers_table(resp)
            elif args.ctl_command == "models":
                stub = inference_pb2_grpc.InferenceStub(channel)
                req_m = inference_pb2.ListModelsRequest()
                resp = await stub.ListModels(req_m, timeout=args.timeout)
                table = _models_table(resp)
            else:
                priority = types_pb2.Priority.Value(f"PRIORITY_{args.priority.upper()}")
                req_e = admin_pb2.ExplainRouteRequest(
                    model=args.model,
                    session_id=args.session,
                    max_tokens=args.max_tokens,
                    prompt_tokens=args.prompt_tokens,
                    priority=priority,
                    policy=args.policy,
                )
                resp = await admin.ExplainRoute(req_e, timeout=args.timeout)
                table = _explain_table(resp)
        except grpc.aio.AioRpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(MessageToDict(resp), indent=2))
    else:
        console.print(table)
    return 0
