"""EtcdRegistry + RegistryView against a real etcd process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshserve.errors import RegistryUnavailable
from meshserve.etcd_process import EtcdProcess, free_port
from meshserve.vocab import ModelKind, ModelState
from registry import events as registry_events
from registry import keys, records
from registry.etcd import EtcdRegistry, WatchCompacted
from registry.events import WorkerEvent
from registry.records import ModelEntry, WorkerRecord
from registry.view import RegistryView

TTL = 2
WORKER_SCRIPT = Path(__file__).with_name("registry_worker_proc.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def rec(worker_id: str, state: ModelState = ModelState.READY, model: str = "m") -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        address="127.0.0.1:5000",
        models=(ModelEntry(model, ModelKind.GENERATE, state),),
        capacity=4,
        start_time=datetime(2024, 1, 1, tzinfo=UTC),
    )


async def etcd_kv(etcd: EtcdProcess, worker_id: str) -> dict[str, Any] | None:
    """The raw etcd KV (mod_revision, version, lease...) of a worker key, via etcdctl."""
    out = json.loads(await etcd.ctl("get", keys.worker_key(worker_id), "-w", "json"))
    kvs = out.get("kvs") or []
    return dict(kvs[0]) if kvs else None


@pytest.fixture
async def registry(etcd: EtcdProcess) -> AsyncIterator[EtcdRegistry]:
    async with EtcdRegistry([etcd.endpoint], ttl=TTL, op_timeout=2.0) as reg:
        yield reg


async def open_view(registry: EtcdRegistry) -> RegistryView:
    view = RegistryView(registry, resync_backoff=0.1, probe_interval=0.2)
    await view.start()
    await asyncio.wait_for(view.wait_started(), 5)
    return view


@pytest.fixture
async def view(etcd: EtcdProcess) -> AsyncIterator[RegistryView]:
    async with EtcdRegistry([etcd.endpoint], op_timeout=1.0) as reg:
        v = await open_view(reg)
        try:
            yield v
        finally:
            await v.stop()


async def test_register_shows_up_in_view(registry: EtcdRegistry, view: RegistryView) -> None:
    changes: list[int] = []
    view.add_listener(lambda: changes.append(view.revision))
    record = rec("w1")
    await registry.register(record)
    assert registry.registered and registry.lease_id != 0

    await view.wait_for(lambda w: "w1" in w, timeout=5)
    assert view.workers["w1"] == record
    assert view.ready_for("m") == [record]
    assert view.ready_for("other") == []
    assert view.models() == {"m"}
    assert view.connected and view.revision > 0 and changes


async def test_update_changes_view(registry: EtcdRegistry, view: RegistryView) -> None:
    await registry.register(rec("w1"))
    await view.wait_for(lambda w: "w1" in w, timeout=5)

    assert await registry.update(rec("w1", ModelState.LOADING)) is True
    await view.wait_for(lambda w: w["w1"].models[0].state is ModelState.LOADING, timeout=5)
    assert view.ready_for("m") == []


async def test_identical_update_does_not_write(etcd: EtcdProcess, registry: EtcdRegistry) -> None:
    await registry.register(rec("w1"))
    before = await etcd_kv(etcd, "w1")
    _, rev_before = await registry.list_workers()
    assert before is not None and before["version"] == 1
    assert before["lease"] == registry.lease_id

    assert await registry.update(rec("w1")) is False  # equal record, new object
    after = await etcd_kv(etcd, "w1")
    _, rev_after = await registry.list_workers()
    assert after == before and rev_after == rev_before

    assert await registry.update(rec("w1", ModelState.FAILED)) is True
    changed = await etcd_kv(etcd, "w1")
    assert changed is not None and changed["version"] == 2
    assert changed["lease"] == registry.lease_id  # same lease, not a re-register


async def test_deregister_removes_at_once(etcd: EtcdProcess, view: RegistryView) -> None:
    async with EtcdRegistry([etcd.endpoint], ttl=60) as long_lived:
        await long_lived.register(rec("w1"))
        await view.wait_for(lambda w: "w1" in w, timeout=5)
        await long_lived.deregister()
        assert not long_lived.registered
        # Far below the 60 s TTL: the revoke, not the expiry, removed it.
        await view.wait_for(lambda w: "w1" not in w, timeout=2)
    assert await etcd_kv(etcd, "w1") is None


async def test_killed_worker_expires_with_its_lease(etcd: EtcdProcess, view: RegistryView) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER_SCRIPT), etcd.endpoint, "doomed", str(TTL),
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.strip() == b"registered"
        await view.wait_for(lambda w: "doomed" in w, timeout=5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no deregister, no goodbye
        await proc.wait()
    await view.wait_for(lambda w: "doomed" not in w, timeout=TTL + 3)


async def test_view_rides_out_etcd_restart(
    etcd: EtcdProcess, registry: EtcdRegistry, view: RegistryView
) -> None:
    await registry.register(rec("w1"))
    await view.wait_for(lambda w: "w1" in w, timeout=5)

    await etcd.stop()
    await view.wait_for(lambda w: not view.connected, timeout=5)
    assert "w1" in view.workers  # the gateway keeps routing on the last snapshot
    assert view.last_error

    await etcd.start()
    await view.wait_for(lambda w: view.connected, timeout=10)
    assert await registry.update(rec("w1", ModelState.LOADING)) is True
    await view.wait_for(
        lambda w: "w1" in w and w["w1"].models[0].state is ModelState.LOADING, timeout=5
    )
    assert view.connected and view.last_error == ""


async def test_keepalive_survives_etcd_outage(
    etcd: EtcdProcess, registry: EtcdRegistry, view: RegistryView
) -> None:
    await registry.register(rec("w1"))
    lease = registry.lease_id
    await view.wait_for(lambda w: "w1" in w, timeout=5)

    await etcd.stop()
    await asyncio.sleep(TTL + 1)  # the outage itself: longer than the lease TTL
    await etcd.start()

    await view.wait_for(lambda w: view.connected, timeout=10)
    with pytest.raises(TimeoutError):  # nothing may remove it for 2 TTLs
        await view.wait_for(lambda w: "w1" not in w, timeout=2 * TTL)
    kv = await etcd_kv(etcd, "w1")
    assert kv is not None and kv["lease"] == lease == registry.lease_id


async def test_lost_lease_is_regranted(
    etcd: EtcdProcess, registry: EtcdRegistry, view: RegistryView
) -> None:
    seen: list[bool] = []
    view.add_listener(lambda: seen.append("w1" in view.workers))
    await registry.register(rec("w1"))
    old = registry.lease_id
    await view.wait_for(lambda w: "w1" in w, timeout=5)

    await etcd.ctl("lease", "revoke", f"{old:x}")  # as if it had expired
    await view.wait_for(lambda w: "w1" in w and registry.lease_id != old, timeout=TTL + 3)
    assert False in seen  # it really was gone in between
    kv = await etcd_kv(etcd, "w1")
    assert kv is not None and kv["lease"] == registry.lease_id


async def test_watch_from_compacted_revision_raises(
    etcd: EtcdProcess, registry: EtcdRegistry
) -> None:
    await registry.register(rec("w1"))
    await registry.update(rec("w1", ModelState.LOADING))
    _, revision = await registry.list_workers()
    await etcd.ctl("compact", str(revision))

    with pytest.raises(WatchCompacted) as info:
        async for _ in registry.watch_workers(1):
            pass
    assert info.value.compact_revision == revision


async def test_watch_reports_etcd_loss_and_resumes_without_gap(
    etcd: EtcdProcess, registry: EtcdRegistry
) -> None:
    """A lost stream is raised (not hidden); watching again from the last seen
    revision + 1 replays nothing and misses nothing."""
    await registry.register(rec("w1"))
    _, revision = await registry.list_workers()
    batches: asyncio.Queue[list[WorkerEvent]] = asyncio.Queue()

    async def pump(start: int) -> None:
        async for batch in registry.watch_workers(start):
            await batches.put(batch)

    task = asyncio.create_task(pump(revision + 1))
    try:
        await registry.update(rec("w1", ModelState.LOADING))
        first = await asyncio.wait_for(batches.get(), 5)
        await etcd.restart()
        with pytest.raises(RegistryUnavailable):
            await asyncio.wait_for(task, 10)
        await registry.update(rec("w1", ModelState.FAILED))
        task = asyncio.create_task(pump(first[-1].revision + 1))
        second = await asyncio.wait_for(batches.get(), 10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RegistryUnavailable):
            await task
    states = [ev.record.models[0].state for ev in first + second if ev.record]
    assert states == [ModelState.LOADING, ModelState.FAILED]
    assert second[0].revision > first[0].revision > revision


class HookedRegistry(EtcdRegistry):
    """Runs `after_list` once, right after a list: lets a test act in the gap
    between the view's list and its watch."""

    after_list: Callable[[], Awaitable[None]] | None = None
    lists = 0

    async def list_registry(self) -> tuple[dict[str, WorkerRecord], dict[str, Any], int]:
        result = await super().list_registry()
        self.lists += 1
        hook, self.after_list = self.after_list, None
        if hook is not None:
            await hook()
        return result


async def test_view_relists_after_compaction(etcd: EtcdProcess, registry: EtcdRegistry) -> None:
    await registry.register(rec("w1"))

    async def change_and_compact() -> None:
        await registry.update(rec("w1", ModelState.UNLOADING))
        await registry.update(rec("w1", ModelState.FAILED))
        _, revision = await registry.list_workers()
        await etcd.ctl("compact", str(revision))

    async with HookedRegistry([etcd.endpoint], op_timeout=1.0) as hooked:
        hooked.after_list = change_and_compact
        view = await open_view(hooked)  # its watch starts below the compaction
        try:
            await view.wait_for(lambda w: w["w1"].models[0].state is ModelState.FAILED, timeout=5)
            assert hooked.lists >= 2 and view.connected
        finally:
            await view.stop()


async def test_undecodable_values_are_skipped(
    etcd: EtcdProcess, registry: EtcdRegistry, view: RegistryView
) -> None:
    await etcd.ctl("put", keys.WORKERS_PREFIX + "bad", "garbage")
    await etcd.ctl("put", keys.WORKERS_PREFIX + "not a valid id", "x")
    await registry.register(rec("w1"))
    await view.wait_for(lambda w: "w1" in w, timeout=5)
    assert set(view.workers) == {"w1"}
    workers, _ = await registry.list_workers()
    assert set(workers) == {"w1"}
    raw = base64.b64decode((await etcd_kv(etcd, "bad") or {})["value"])
    assert raw == b"garbage"
    # Valid protobuf that the codec still rejects (ValueError, not RecordDecodeError).
    pb = records.to_pb(rec("w9"))
    pb.start_time.seconds = 10**15
    key = b"/meshserve/v1/workers/w9"
    assert registry_events.decode_worker(key, pb.SerializeToString()) is None


async def test_errors_name_the_endpoint_and_deregister_never_raises(etcd: EtcdProcess) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdRegistry([dead], op_timeout=0.5) as nowhere:
        with pytest.raises(RegistryUnavailable, match=dead):
            await nowhere.register(rec("w1"))
        with pytest.raises(RegistryUnavailable, match=dead):
            await nowhere.list_workers()
        view = RegistryView(nowhere, resync_backoff=0.1)
        await view.start()
        try:
            await view.wait_for(lambda w: bool(view.last_error), timeout=5)
            assert not view.connected and dict(view.workers) == {}
        finally:
            await view.stop()

    async with EtcdRegistry([etcd.endpoint], op_timeout=0.5) as worker:
        await worker.register(rec("w2"))
        await etcd.stop()
        await worker.deregister()  # logs, does not raise
        assert not worker.registered


async def test_update_after_lease_loss_regrants(etcd: EtcdProcess, registry: EtcdRegistry) -> None:
    await registry.register(rec("w1"))
    old = registry.lease_id
    await etcd.ctl("lease", "revoke", f"{old:x}")
    # Whether update() or the keep-alive notices first, the change lands on a new lease.
    await registry.update(rec("w1", ModelState.FAILED))
    kv = await etcd_kv(etcd, "w1")
    assert kv is not None and kv["lease"] == registry.lease_id != old


async def test_etcd_process_kill_and_restart(etcd: EtcdProcess) -> None:
    await etcd.ctl("put", "k", "v")
    old_pid, endpoint = etcd.pid, etcd.endpoint
    etcd.kill()
    assert not etcd.running
    await etcd.restart()  # same ports, same data
    assert etcd.pid != old_pid and etcd.endpoint == endpoint
    assert "v" in await etcd.ctl("get", "k")


async def test_etcd_start_failure_is_clear(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = EtcdProcess(tmp_path / "data", client_port=port)
        with pytest.raises(RuntimeError, match="address already in use"):
            await proc.start(timeout=5)
    assert not proc.running


async def test_aliases_reach_the_view_and_change_at_run_time(
    etcd: EtcdProcess, registry: EtcdRegistry, view: RegistryView
) -> None:
    from registry.aliases import AliasRecord

    await registry.put_alias(AliasRecord("chat", (("m-v1", 9.0), ("m-v2", 1.0))))
    await view.wait_for(lambda _: "chat" in view.aliases, timeout=5)
    assert view.aliases["chat"].targets == (("m-v1", 9.0), ("m-v2", 1.0))
    await registry.put_alias(AliasRecord("chat", (("m-v2", 1.0),)))
    await view.wait_for(lambda _: view.aliases["chat"].targets == (("m-v2", 1.0),), timeout=5)
    assert await registry.delete_alias("chat")
    await view.wait_for(lambda _: "chat" not in view.aliases, timeout=5)
    assert not await registry.delete_alias("chat")
