"""`meshserve up`: a real local mesh (etcd + gateway + N CPU workers) as processes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from meshserve.client import MeshClient
from meshserve.etcd_process import EtcdProcess
from meshserve.launch import Child, launch, meshserve_argv, stop_all
from meshserve.v1 import types_pb2

DEFAULT_MODELS = ["tiny-llama", "minilm"]
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _spawn(name: str, args: list[str], logs: Path, env: dict[str, str] | None = None) -> Child:
    # Own session: a terminal Ctrl-C reaches `up` only, which stops children in order.
    return launch(
        name, meshserve_argv(*args), logs / f"{name}.log", env=env, new_session=True, append=True
    )


def _progress_table(
    resp: object, workers: list[str], models: list[str]
) -> tuple[Table, bool, bool]:
    states: dict[tuple[str, str], str] = {}
    for m in getattr(resp, "models", []):
        for r in m.replicas:
            states[(r.worker_id, m.name)] = types_pb2.ModelState.Name(r.state).removeprefix(
                "MODEL_STATE_"
            ).lower() + (f" ({r.error[:60]})" if r.error else "")
    table = Table(title="local mesh", show_edge=False)
    table.add_column("worker")
    for m in models:
        table.add_column(m)
    ready, failed = True, False
    for w in workers:
        row = [states.get((w, m), "starting") for m in models]
        ready &= all(s == "ready" for s in row)
        failed |= any(s.startswith("failed") for s in row)
        table.add_row(w, *row)
    return table, ready, failed


async def _wait_ready(
    target: str, children: list[Child], workers: list[str], models: list[str], console: Console
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with MeshClient(target) as client:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while True:
                for c in children:
                    c.check_alive()
                resp: object = None
                with contextlib.suppress(grpc.aio.AioRpcError):
                    resp = await client.list_models(timeout=2.0)
                table, ready, failed = _progress_table(resp, workers, models)
                live.update(table)
                if failed:
                    raise RuntimeError("a model failed to load; see the table above and the logs")
                if ready:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the mesh was not ready after {READY_TIMEOUT_S:.0f} s")
                await asyncio.sleep(0.25)  # polling a remote service for a progress display


async def run_up(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    models: list[str] = args.model or DEFAULT_MODELS
    if args.workers < 1:
        console.print("[red]--workers must be at least 1[/]")
        return 2
    if not _port_free(args.port):
        console.print(f"[red]port {args.port} is in use[/]: stop what uses it or pass --port")
        return 2

    missing = [m for m in models if not (args.models_dir / m / "meshserve-model.json").exists()]
    if missing:
        from meshserve.demo import make_demo

        with console.status("making demo models (first run only)") as st:
            make_demo(args.models_dir, progress=st.update)

    own_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="meshserve-")) if own_dir else args.data_dir
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    etcd = EtcdProcess(data_dir / "etcd", client_port=args.etcd_port, log_path=logs / "etcd.log")
    children: list[Child] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    target = f"127.0.0.1:{args.port}"
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    worker_ids = [f"worker-{i}" for i in range(1, args.workers + 1)]
    code = 0
    try:
        with console.status("starting etcd"):
            await etcd.start()
        console.print(f"[green]ok[/] etcd on {etcd.endpoint}")
        children.append(
            _spawn(
                "gateway",
                ["gateway", "--listen", target, "--etcd", etcd.endpoint],
                logs,
                # No load balancer in front of a local mesh: nothing to wait for on Ctrl-C.
                env={"MESHSERVE_GATEWAY_DRAIN_ACCEPT_S": "0"},
            )
        )
        for wid in worker_ids:
            wargs = ["worker", "--worker-id", wid, "--etcd", etcd.endpoint]
            wargs += ["--models-dir", str(args.models_dir), "--torch-threads", str(threads)]
            for m in models:
                wargs += ["--model", m]
            children.append(_spawn(wid, wargs, logs))
        console.print(f"[green]ok[/] gateway and {args.workers} worker(s) started; logs in {logs}")
        ready = asyncio.create_task(_wait_ready(target, children, worker_ids, models, console))
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped in done:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await ready
            return 130
        stopped.cancel()
        ready.result()
        _print_banner(console, target, models)
        print(f"meshserve: ready on {target}", flush=True)
        await _wait_stop_or_death(stop, children, console)
        code = 0 if stop.is_set() else 1
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        code = 1
    finally:
        with console.status("shutting down"):
            await stop_all(children, STOP_GRACE_S)
            await etcd.stop()
        console.print("stopped")
        if own_dir and code == 0:
            shutil.rmtree(data_dir, ignore_errors=True)
    return code


async def _wait_stop_or_death(stop: asyncio.Event, children: list[Child], console: Console) -> None:
    waits = {asyncio.create_task(c.wait()): c for c in children}
    stopper = asyncio.create_task(stop.wait())
    done, pending = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    for t in done:
        if t in waits:
            c = waits[t]
            console.print(f"[red]{c.name} exited unexpectedly[/]:\n{c.log_tail()}")


def _print_banner(console: Console, target: str, models: list[str]) -> None:
    gen = next((m for m in models if "llama" in m), models[0])
    body = json.dumps({"model": gen, "prompt": "Once upon a time", "sampling": {"max_tokens": 16}})
    console.print(f"\n[bold green]mesh ready[/] on {target}  (Ctrl-C to stop)\n")
    # soft_wrap: commands must stay on one line to be copy-pasted.
    for line in (
        "try:",
        f"  meshserve generate --target {target} --model {gen} 'Once upon a time'",
        f"  grpcurl -plaintext {target} list",
        f"  grpcurl -plaintext -d '{body}' {target} meshserve.v1.Inference/Generate\n",
    ):
        console.print(line, soft_wrap=True, highlight=False, markup=False)
