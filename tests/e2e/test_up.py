"""`meshserve up` as a real process tree: ready, serves, stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from meshserve.client import MeshClient
from meshserve.etcd_process import free_port

pytestmark = pytest.mark.e2e


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.add(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(300)
async def test_up_serves_then_shuts_down_on_sigint(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshserve", "up", "--workers", "2", "--port", str(port),
        "--models-dir", str(models_dir), "--data-dir", str(tmp_path / "run"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 240)
        assert b"meshserve: ready" in line, (await proc.stderr.read(4000)).decode()
        children = _children(proc.pid)
        assert len(children) >= 4  # etcd, gateway, 2 workers

        async with MeshClient(f"127.0.0.1:{port}") as client:
            msgs = [
                m async for m in client.generate("tiny-llama", "Hello", max_tokens=4, timeout=30)
            ]
            assert msgs[-1].usage.completion_tokens == 4
            listed = await client.list_models(timeout=5)
            replicas = {r.worker_id for m in listed.models for r in m.replicas}
            assert replicas == {"worker-1", "worker-2"}

        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert not [pid for pid in children if _alive(pid)], "meshserve up left processes behind"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
