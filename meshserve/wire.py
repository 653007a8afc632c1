"""The vocabulary's enums to and from protobuf: the one table per enum."""

from __future__ import annotations

from meshserve.v1 import registry_pb2, types_pb2
from meshserve.vocab import ModelKind, ModelState, WorkerState

MODEL_KIND_TO_PB: dict[ModelKind, types_pb2.ModelKind.ValueType] = {
    ModelKind.GENERATE: types_pb2.MODEL_KIND_GENERATE,
    ModelKind.INFER: types_pb2.MODEL_KIND_INFER,
}
MODEL_KIND_FROM_PB = {v: k for k, v in MODEL_KIND_TO_PB.items()}

MODEL_STATE_TO_PB: dict[ModelState, types_pb2.ModelState.ValueType] = {
    ModelState.LOADING: types_pb2.MODEL_STATE_LOADING,
    ModelState.READY: types_pb2.MODEL_STATE_READY,
    ModelState.FAILED: types_pb2.MODEL_STATE_FAILED,
    ModelState.UNLOADING: types_pb2.MODEL_STATE_UNLOADING,
}
MODEL_STATE_FROM_PB = {v: k for k, v in MODEL_STATE_TO_PB.items()}

WORKER_STATE_TO_PB: dict[WorkerState, registry_pb2.WorkerState.ValueType] = {
    WorkerState.SERVING: registry_pb2.WORKER_STATE_SERVING,
    WorkerState.DRAINING: registry_pb2.WORKER_STATE_DRAINING,
}
WORKER_STATE_FROM_PB = {v: k for k, v in WORKER_STATE_TO_PB.items()}

DEVICE_KIND_TO_PB: dict[str, types_pb2.DeviceKind.ValueType] = {
    "cpu": types_pb2.DEVICE_KIND_CPU,
    "cuda": types_pb2.DEVICE_KIND_CUDA,
    "mps": types_pb2.DEVICE_KIND_MPS,
}
DEVICE_KIND_FROM_PB = {v: k for k, v in DEVICE_KIND_TO_PB.items()}
