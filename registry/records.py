"""WorkerRecord: the one contract shared by workers and gateways, and its codec.

Dataclasses inside the mesh, protobuf (meshserve.v1.WorkerRecord) in etcd.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from meshserve import wire
from meshserve.v1 import registry_pb2, types_pb2
from meshserve.vocab import Device, ModelKind, ModelState, WorkerState


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: ModelKind
    state: ModelState
    backend: str = ""
    error: str = ""
    max_concurrency: int = 0
    kv_cache_tokens: int = 0
    max_sequence_length: int = 0


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    address: str
    device: Device = field(default_factory=Device)
    models: tuple[ModelEntry, ...] = ()
    capacity: int = 0
    state: WorkerState = WorkerState.SERVING
    version: str = ""
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    labels: Mapping[str, str] = field(default_factory=dict)

    def model(self, name: str) -> ModelEntry | None:
        for m in self.models:
            if m.name == name:
                return m
        return None

    def serves(self, name: str) -> bool:
        """READY for `name` and not draining."""
        m = self.model(name)
        return m is not None and m.state is ModelState.READY and self.state is WorkerState.SERVING


class RecordDecodeError(ValueError):
    """An etcd value that is not a valid WorkerRecord."""


def to_pb(rec: WorkerRecord) -> registry_pb2.WorkerRecord:
    pb = registry_pb2.WorkerRecord(
        worker_id=rec.worker_id,
        address=rec.address,
        device=registry_pb2.Device(
            kind=wire.DEVICE_KIND_TO_PB.get(rec.device.kind, types_pb2.DEVICE_KIND_UNSPECIFIED),
            index=rec.device.index,
            name=rec.device.name,
            memory_bytes=rec.device.memory_bytes,
        ),
        models=[
            registry_pb2.ModelRecord(
                name=m.name,
                kind=wire.MODEL_KIND_TO_PB[m.kind],
                state=wire.MODEL_STATE_TO_PB[m.state],
                backend=m.backend,
                error=m.error,
                max_concurrency=m.max_concurrency,
                kv_cache_tokens=m.kv_cache_tokens,
                max_sequence_length=m.max_sequence_length,
            )
            for m in rec.models
        ],
        capacity=rec.capacity,
        state=wire.WORKER_STATE_TO_PB[rec.state],
        version=rec.version,
        labels=dict(rec.labels),
    )
    pb.start_time.FromDatetime(rec.start_time)
    return pb


def from_pb(pb: registry_pb2.WorkerRecord) -> WorkerRecord:
    try:
        models = tuple(
            ModelEntry(
                name=m.name,
                kind=wire.MODEL_KIND_FROM_PB[m.kind],
                state=wire.MODEL_STATE_FROM_PB[m.state],
                backend=m.backend,
                error=m.error,
                max_concurrency=m.max_concurrency,
                kv_cache_tokens=m.kv_cache_tokens,
                max_sequence_length=m.max_sequence_length,
            )
            for m in pb.models
        )
        state = wire.WORKER_STATE_FROM_PB[pb.state]
    except KeyError as exc:
        raise RecordDecodeError(f"unknown enum value in worker record: {exc}") from exc
    if not pb.worker_id or not pb.address:
        raise RecordDecodeError("worker record without worker_id or address")
    try:
        start_time = pb.start_time.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise RecordDecodeError(f"worker record with a bad start_time: {exc}") from exc
    return WorkerRecord(
        worker_id=pb.worker_id,
        address=pb.address,
        device=Device(
            kind=wire.DEVICE_KIND_FROM_PB.get(pb.device.kind, "cpu"),
            index=pb.device.index,
            name=pb.device.name,
            memory_bytes=pb.device.memory_bytes,
        ),
        models=models,
        capacity=pb.capacity,
        state=state,
        version=pb.version,
        start_time=start_time,
        labels=dict(pb.labels),
    )


def encode(rec: WorkerRecord) -> bytes:
    return to_pb(rec).SerializeToString(deterministic=True)


def decode(data: bytes) -> WorkerRecord:
    pb = registry_pb2.WorkerRecord()
    try:
        pb.ParseFromString(data)
    except DecodeError as exc:
        raise RecordDecodeError(f"undecodable worker record: {exc}") from exc
    return from_pb(pb)
