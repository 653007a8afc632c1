"""A worker puts its own registry record back when someone else deletes or changes it
(real etcd, a real Worker with a fake model, a separate etcd client as the intruder)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import etcd3aio
import pytest

from meshserve.etcd_process import EtcdProcess
from meshserve.vocab import ModelState
from registry import keys, records
from registry.etcd import EtcdRegistry
from registry.view import RegistryView
from tests.mesh import worker_settings
from worker.lifecycle import Worker

KEY = keys.worker_key("g1")
RESTORE_S = 1.0  # the promise: back within a second


@pytest.fixture
async def worker(etcd: EtcdProcess, tmp_path: Path) -> AsyncIterator[Worker]:
    w = Worker(
        worker_settings(
            etcd.endpoint, tmp_path, "g1", [],
            fake_models=["fake"], fake_options={"per_request_ms": "0"},
            metrics_port=0,  # its etcd write counter
        )
    )  # fmt: skip
    await w.start()
    try:
        yield w
    finally:
        await w.stop()


@pytest.fixture
async def view(etcd: EtcdProcess, worker: Worker) -> AsyncIterator[RegistryView]:
    async with EtcdRegistry([etcd.endpoint], op_timeout=1.0) as reg:
        v = RegistryView(reg, resync_backoff=0.1, probe_interval=0.2)
        await v.start()
        try:
            await v.wait_for(lambda w: "g1" in w and w["g1"].serves("fake"), timeout=10)
            yield v
        finally:
            await v.stop()


@pytest.fixture
async def intruder(etcd: EtcdProcess) -> AsyncIterator[Any]:
    """Another etcd client, writing the worker's key behind its back."""
    client = etcd3aio.Etcd3Client([etcd.endpoint])
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


def lease_of(w: Worker) -> int:
    assert w._registry is not None
    return w._registry.lease_id


async def puts(w: Worker) -> float:
    """The worker's successful etcd puts, from its metrics."""
    assert w.metrics is not None
    # From a thread, as a scrape: its collectors wait for the event loop.
    sample = await asyncio.to_thread(
        w.metrics.registry.get_sample_value,
        "meshserve_registry_requests_total",
        {"op": "put", "outcome": "ok"},
    )
    return sample or 0.0


async def raw(intruder: Any) -> Any:
    resp = await intruder.kv.get(KEY)
    return resp.kvs[0] if resp.kvs else None


async def wait_restored(view: RegistryView, w: Worker, after: int, timeout: float) -> None:
    """Until the view holds w's own record at a revision past the intruder's `after`."""
    await view.wait_for(
        lambda ws: view.revision > after and ws.get("g1") == w.record(), timeout=timeout
    )


async def test_deleted_record_is_back_within_a_second(
    worker: Worker, view: RegistryView, intruder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.guard")
    resp = await intruder.kv.delete(KEY)
    await wait_restored(view, worker, int(resp.header.revision), RESTORE_S)
    kv = await raw(intruder)
    assert kv is not None and kv.lease == lease_of(worker)  # still lease-bound
    assert worker.guard is not None and worker.guard.restored == 1
    assert any("g1" in r.message and "removed" in r.message for r in caplog.records)


async def test_overwritten_record_is_restored(
    worker: Worker, view: RegistryView, intruder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="registry.guard")
    own = worker.record()
    resp = await intruder.kv.put(KEY, records.encode(replace(own, address="127.0.0.1:1")))
    await wait_restored(view, worker, int(resp.header.revision), RESTORE_S)
    assert any("127.0.0.1:1" in r.message for r in caplog.records)

    # Our exact bytes, but without our lease: the key would outlive the worker.
    resp = await intruder.kv.put(KEY, records.encode(own))
    await wait_restored(view, worker, int(resp.header.revision), RESTORE_S)
    kv = await raw(intruder)
    assert kv is not None and kv.lease == lease_of(worker)
    assert worker.guard is not None and worker.guard.restored == 2


async def test_own_updates_cause_no_extra_writes(
    worker: Worker, view: RegistryView, intruder: Any
) -> None:
    assert worker.host is not None and worker._registry is not None
    version = (await raw(intruder)).version  # the key's puts since it was created
    slot = worker.host._slots["fake"]
    # A burst of own writes, back to back: the guard sees their events only after
    # later ones have landed (a value comparison would take them for an intruder's).
    for i in range(5):
        slot.error = f"state {i}"
        assert await worker._registry.update(worker.record()) is True
    # And one through the worker's own publisher (a model state change).
    slot.state = ModelState.FAILED
    worker.host._notify()
    await view.wait_for(lambda ws: ws["g1"] == worker.record(), timeout=5)
    last = view.revision

    # Nothing else may be written: wait a while for anything after our last write.
    with pytest.raises(TimeoutError):
        await view.wait_for(lambda ws: view.revision > last, timeout=3 * RESTORE_S)
    kv = await raw(intruder)
    assert kv.version == version + 6
    assert await puts(worker) == kv.version  # every put of the worker was one of those
    assert worker.guard is not None and worker.guard.restored == 0


async def test_lost_lease_is_replaced_and_the_record_restored(
    etcd: EtcdProcess, worker: Worker, view: RegistryView, intruder: Any
) -> None:
    old = lease_of(worker)
    resp = await intruder.lease.revoke(old)  # the key goes with it, as on expiry
    await wait_restored(view, worker, int(resp.header.revision), RESTORE_S)
    kv = await raw(intruder)
    assert kv is not None and kv.lease == lease_of(worker) != old


async def test_guard_rides_out_an_etcd_outage(
    etcd: EtcdProcess, worker: Worker, view: RegistryView, intruder: Any
) -> None:
    await etcd.stop()
    await view.wait_for(lambda ws: not view.connected, timeout=5)
    await etcd.start()
    await view.wait_for(lambda ws: view.connected and "g1" in ws, timeout=10)

    resp = await intruder.kv.delete(KEY)
    # Its watch may still be backing off (at most 2 s) when the delete lands.
    await wait_restored(view, worker, int(resp.header.revision), RESTORE_S + 2.0)
    guard_task = next(t for t in worker._tasks if t.get_name() == "record-guard")
    assert not guard_task.done()
