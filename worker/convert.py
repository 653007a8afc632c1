"""Protobuf <-> worker dataclasses. The only place the worker maps wire types."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from meshserve import load, wire
from meshserve.errors import InvalidArgument
from meshserve.v1 import inference_pb2
from meshserve.vocab import ModelState
from worker.types import (
    DEFAULT_MAX_TOKENS,
    DType,
    FinishReason,
    GenerateChunk,
    GenerateInput,
    InferInput,
    InferOutput,
    ModelStatus,
    SamplingParams,
    TensorData,
)

# Hard caps on what one request may ask for; engines add their own, tighter ones.
MAX_TOKENS_LIMIT = 32768
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256

_NUMPY: dict[DType, np.dtype] = {
    DType.BOOL: np.dtype("?"),
    DType.UINT8: np.dtype("u1"),
    DType.INT8: np.dtype("i1"),
    DType.INT16: np.dtype("<i2"),
    DType.INT32: np.dtype("<i4"),
    DType.INT64: np.dtype("<i8"),
    DType.FP16: np.dtype("<f2"),
    DType.BF16: np.dtype("<u2"),  # numpy has no bfloat16: carry the raw bits
    DType.FP32: np.dtype("<f4"),
    DType.FP64: np.dtype("<f8"),
}
_DTYPE_FROM_PB: dict[inference_pb2.DataType.ValueType, DType] = {
    inference_pb2.DATA_TYPE_BOOL: DType.BOOL,
    inference_pb2.DATA_TYPE_UINT8: DType.UINT8,
    inference_pb2.DATA_TYPE_INT8: DType.INT8,
    inference_pb2.DATA_TYPE_INT16: DType.INT16,
    inference_pb2.DATA_TYPE_INT32: DType.INT32,
    inference_pb2.DATA_TYPE_INT64: DType.INT64,
    inference_pb2.DATA_TYPE_FP16: DType.FP16,
    inference_pb2.DATA_TYPE_BF16: DType.BF16,
    inference_pb2.DATA_TYPE_FP32: DType.FP32,
    inference_pb2.DATA_TYPE_FP64: DType.FP64,
    inference_pb2.DATA_TYPE_STRING: DType.STRING,
    inference_pb2.DATA_TYPE_BYTES: DType.BYTES,
}
_DTYPE_TO_PB = {v: k for k, v in _DTYPE_FROM_PB.items()}
_FINISH_TO_PB = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}


def to_sampling(pb: inference_pb2.SamplingParams) -> SamplingParams:
    max_tokens = pb.max_tokens or DEFAULT_MAX_TOKENS
    if max_tokens > MAX_TOKENS_LIMIT:
        raise InvalidArgument(
            f"sampling.max_tokens={max_tokens} exceeds {MAX_TOKENS_LIMIT}",
            field="sampling.max_tokens",
        )
    temperature = pb.temperature if pb.HasField("temperature") else 1.0
    if not temperature >= 0.0:  # also rejects NaN
        raise InvalidArgument(
            f"sampling.temperature must be >= 0, got {temperature}", field="sampling.temperature"
        )
    top_p = pb.top_p if pb.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(
            f"sampling.top_p must be in (0, 1], got {top_p}", field="sampling.top_p"
        )
    if len(pb.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(pb.stop)}", field="sampling.stop"
        )
    for s in pb.stop:
        if not s or len(s) > MAX_STOP_LEN:
            raise InvalidArgument(
                f"stop strings must be 1-{MAX_STOP_LEN} characters long", field="sampling.stop"
            )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=pb.top_k if pb.HasField("top_k") else 0,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        ignore_eos=pb.ignore_eos,
    )


def to_generate_input(pb: inference_pb2.GenerateRequest, request_id: str) -> GenerateInput:
    if not pb.model:
        raise InvalidArgument("model is required", field="model")
    has_text = bool(pb.prompt)
    has_ids = len(pb.prompt_token_ids) > 0
    if has_text == has_ids:
        raise InvalidArgument(
            "set exactly one of prompt (text) and prompt_token_ids", field="prompt"
        )
    return GenerateInput(
        request_id=request_id,
        model=pb.model,
        prompt=pb.prompt if has_text else None,
        prompt_token_ids=tuple(pb.prompt_token_ids) if has_ids else None,
        sampling=to_sampling(pb.sampling),
        continuation=tuple(pb.continuation.token_ids),
        resumed=pb.continuation.resumed,
    )


def to_pb_chunk(
    chunk: GenerateChunk, request_id: str, resumed: int = 0
) -> inference_pb2.GenerateResponse:
    msg = inference_pb2.GenerateResponse(
        request_id=request_id, text=chunk.text, token_ids=chunk.token_ids
    )
    if chunk.finish is not None:
        msg.finish_reason = _FINISH_TO_PB[chunk.finish]
        msg.resumed = resumed
    if chunk.usage is not None:
        msg.usage.prompt_tokens = chunk.usage.prompt_tokens
        msg.usage.completion_tokens = chunk.usage.completion_tokens
    return msg


def _element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def to_tensor(pb: inference_pb2.Tensor, path: str = "inputs[0]") -> TensorData:
    name = pb.name or "input"
    dtype = _DTYPE_FROM_PB.get(pb.dtype)
    if dtype is None:
        raise InvalidArgument(
            f"tensor {name!r}: dtype is missing or unknown", field=f"{path}.dtype"
        )
    shape = tuple(int(d) for d in pb.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(
            f"tensor {name!r}: negative dimension in shape {list(shape)}", field=f"{path}.shape"
        )
    count = _element_count(shape)
    if dtype is DType.STRING:
        if len(pb.string_contents) != count:
            raise InvalidArgument(
                f"tensor {name!r}: shape {list(shape)} needs {count} string_contents, "
                f"got {len(pb.string_contents)}",
                field=f"{path}.string_contents",
            )
        return TensorData(name, dtype, shape, elements=tuple(pb.string_contents))
    if dtype is DType.BYTES:
        if len(pb.bytes_contents) != count:
            raise InvalidArgument(
                f"tensor {name!r}: shape {list(shape)} needs {count} bytes_contents, "
                f"got {len(pb.bytes_contents)}",
                field=f"{path}.bytes_contents",
            )
        return TensorData(name, dtype, shape, elements=tuple(pb.bytes_contents))
    np_dtype = _NUMPY[dtype]
    if len(pb.raw_contents) != count * np_dtype.itemsize:
        raise InvalidArgument(
            f"tensor {name!r}: shape {list(shape)} of {dtype.value} needs "
            f"{count * np_dtype.itemsize} bytes of raw_contents, got {len(pb.raw_contents)}",
            field=f"{path}.raw_contents",
        )
    array = np.frombuffer(pb.raw_contents, dtype=np_dtype).reshape(shape)
    return TensorData(name, dtype, shape, array=array)


def to_pb_tensor(t: TensorData) -> inference_pb2.Tensor:
    msg = inference_pb2.Tensor(name=t.name, dtype=_DTYPE_TO_PB[t.dtype], shape=list(t.shape))
    if t.dtype is DType.STRING:
        msg.string_contents.extend(str(e) for e in t.elements or ())
    elif t.dtype is DType.BYTES:
        msg.bytes_contents.extend(bytes(e) for e in t.elements or ())  # type: ignore[arg-type]
    elif t.array is not None:
        msg.raw_contents = np.ascontiguousarray(t.array, dtype=_NUMPY[t.dtype]).tobytes()
    return msg


def to_infer_input(pb: inference_pb2.InferRequest, request_id: str) -> InferInput:
    if not pb.model:
        raise InvalidArgument("model is required", field="model")
    if not pb.inputs:
        raise InvalidArgument("at least one input tensor is required", field="inputs")
    return InferInput(
        request_id=request_id,
        model=pb.model,
        inputs=tuple(to_tensor(t, f"inputs[{i}]") for i, t in enumerate(pb.inputs)),
        outputs=tuple(pb.outputs),
    )


def to_pb_infer_response(
    out: InferOutput, *, model: str, request_id: str
) -> inference_pb2.InferResponse:
    return inference_pb2.InferResponse(
        model=model, request_id=request_id, outputs=[to_pb_tensor(t) for t in out.outputs]
    )


def generate_cost(
    last: list[GenerateChunk], started: float, continued: int = 0
) -> load.CallCost | None:
    """What a Generate call cost the engine: its time excluding the wait for a slot, and
    its work in units of a default-sized (16-token) generation. Tokens of a
    continuation were made elsewhere: usage counts them, this worker's cost does not."""
    if not last or last[0].usage is None:
        return None
    chunk = last[0]
    usage = chunk.usage
    assert usage is not None
    made = max(usage.completion_tokens - continued, 0)
    work = max(made, 1) / DEFAULT_MAX_TOKENS
    elapsed = time.perf_counter() - started - chunk.queue_s
    return load.CallCost(elapsed, work, made)


def infer_cost(out: InferOutput, started: float) -> load.CallCost:
    return load.CallCost(time.perf_counter() - started - out.queue_s, out.work or 1.0)


def to_list_models_response(
    statuses: Iterable[ModelStatus], model: str, *, worker_id: str, address: str, device: str
) -> inference_pb2.ListModelsResponse:
    """This worker's models, each with itself as the one replica."""
    resp = inference_pb2.ListModelsResponse()
    for st in statuses:
        if model and st.spec.name != model:
            continue
        state = wire.MODEL_STATE_TO_PB[st.state]
        ready = st.state is ModelState.READY
        resp.models.append(
            inference_pb2.ModelStatus(
                name=st.spec.name,
                kind=wire.MODEL_KIND_TO_PB[st.spec.kind],
                state=state,
                backend=st.spec.backend,
                replicas=[
                    inference_pb2.ModelReplica(
                        worker_id=worker_id,
                        address=address,
                        state=state,
                        device=device,
                        error=st.error,
                        max_concurrency=st.max_concurrency if ready else 0,
                        kv_cache_tokens=st.kv_cache_tokens if ready else 0,
                        max_sequence_length=st.max_sequence_length if ready else 0,
                    )
                ],
            )
        )
    return resp
