"""WorkerRecord: the one contract shared by workers and gateways, and its codec.

Dataclasses inside the mesh, protobuf (meshserve.v1.WorkerRecord) in etcd.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from meshserve.v1 import registry_pb2, types_pb2


class WorkerState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"


class RecordModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


class RecordModelKind(enum.Enum):
    GENERATE = "generate"
    INFER = "infer"


@dataclass(frozen=True)
class DeviceRecord:
    kind: str = "cpu"  # cpu | cuda | mps
    index: int = 0
    name: str = ""
    memory_bytes: int = 0

    @property
    def label(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: RecordModelKind
    state: RecordModelState
    backend: str = ""
    error: str = ""
    max_concurrency: int = 0
    kv_cache_tokens: int = 0
    max_sequence_length: int = 0


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    address: str
    device: DeviceRecord = field(default_factory=DeviceRecord)
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
        return (
            m is not None
            and m.state is RecordModelState.READY
            and self.state is WorkerState.SERVING
        )


class RecordDecodeError(ValueError):
    """An etcd value that is not a valid WorkerRecord."""


_DEVICE_KINDS = {
    "cpu": types_pb2.DEVICE_KIND_CPU,
    "cuda": types_pb2.DEVICE_KIND_CUDA,
    "mps": types_pb2.DEVICE_KIND_MPS,
}
_DEVICE_KINDS_REV = {v: k for k, v in _DEVICE_KINDS.items()}
_MODEL_STATES = {
    RecordModelState.LOADING: types_pb2.MODEL_STATE_LOADING,
    RecordModelState.READY: types_pb2.MODEL_STATE_READY,
    RecordModelState.FAILED: types_pb2.MODEL_STATE_FAILED,
    RecordModelState.UNLOADING: types_pb2.MODEL_STATE_UNLOADING,
}
_MODEL_STATES_REV = {v: k for k, v in _MODEL_STATES.items()}
_MODEL_KINDS = {
    RecordModelKind.GENERATE: types_pb2.MODEL_KIND_GENERATE,
    RecordModelKind.INFER: types_pb2.MODEL_KIND_INFER,
}
_MODEL_KINDS_REV = {v: k for k, v in _MODEL_KINDS.items()}
_WORKER_STATES = {
    WorkerState.SERVING: registry_pb2.WORKER_STATE_SERVING,
    WorkerState.DRAINING: registry_pb2.WORKER_STATE_DRAINING,
}
_WORKER_STATES_REV = {v: k for k, v in _WORKER_STATES.items()}


def model_state_to_pb(state: RecordModelState) -> types_pb2.ModelState.ValueType:
    return _MODEL_STATES[state]


def model_kind_to_pb(kind: RecordModelKind) -> types_pb2.ModelKind.ValueType:
    return _MODEL_KINDS[kind]


def to_pb(rec: WorkerRecord) -> registry_pb2.WorkerRecord:
    pb = registry_pb2.WorkerRecord(
        worker_id=rec.worker_id,
        address=rec.address,
        device=registry_pb2.Device(
            kind=_DEVICE_KINDS.get(rec.device.kind, types_pb2.DEVICE_KIND_UNSPECIFIED),
            index=rec.device.index,
            name=rec.device.name,
            memory_bytes=rec.device.memory_bytes,
        ),
        models=[
            registry_pb2.ModelRecord(
                name=m.name,
                kind=_MODEL_KINDS[m.kind],
                state=_MODEL_STATES[m.state],
                backend=m.backend,
                error=m.error,
                max_concurrency=m.max_concurrency,
                kv_cache_tokens=m.kv_cache_tokens,
                max_sequence_length=m.max_sequence_length,
            )
            for m in rec.models
        ],
        capacity=rec.capacity,
        state=_WORKER_STATES[rec.state],
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
                kind=_MODEL_KINDS_REV[m.kind],
                state=_MODEL_STATES_REV[m.state],
                backend=m.backend,
                error=m.error,
                max_concurrency=m.max_concurrency,
                kv_cache_tokens=m.kv_cache_tokens,
                max_sequence_length=m.max_sequence_length,
            )
            for m in pb.models
        )
        state = _WORKER_STATES_REV[pb.state]
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
        device=DeviceRecord(
            kind=_DEVICE_KINDS_REV.get(pb.device.kind, "cpu"),
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
