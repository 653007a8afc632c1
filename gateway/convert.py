"""Protobuf <-> the gateway's domain: routing facts read from request bytes (which are
never re-encoded), the metadata sent on to the worker, and the fleet view of ListModels."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from google.protobuf.message import DecodeError

from gateway.scheduler.types import RequestFacts
from meshserve import wire
from meshserve.edge import Call
from meshserve.errors import InvalidArgument
from meshserve.metadata import (
    POLICY_KEY,
    REQUEST_ID_KEY,
    TRACEPARENT_KEY,
    TRACESTATE_KEY,
)
from meshserve.v1 import inference_pb2, types_pb2
from meshserve.vocab import ModelState, WorkerState
from registry.records import WorkerRecord

DEFAULT_MAX_TOKENS = 16  # the API's default (SamplingParams.max_tokens)

Resolve = Callable[[str], str]
Metadata = tuple[tuple[str, str], ...]


def model_field(name: str) -> bytes:
    """`model` (field 1, a string) serialized on its own. Appended to a request it
    overrides the earlier value (protobuf: the last value of a scalar field wins),
    so an alias is resolved without decoding and re-encoding the payload."""
    data = name.encode()
    n, length = len(data), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return b"\x0a" + bytes(length) + data


def _facts(
    call: Call,
    resolve: Resolve,
    payload: bytes,
    model: str,
    request_id: str,
    *,
    session_id: str = "",
    priority: int = 0,
    size_hint: float = 1.0,
    min_tokens: int = 0,
) -> tuple[RequestFacts, bytes]:
    """Built once per call (this is the per-call path: a frozen dataclass costs ~1 us)."""
    if not model:
        raise InvalidArgument("model is required", field="model")
    call.request_id = request_id  # the request's own id wins over the metadata's
    target = resolve(model)
    if target != model:
        payload = payload + model_field(target)
    call.model = target
    policy = call.metadata.get(POLICY_KEY, "") if call.metadata else ""
    facts = RequestFacts(
        target, session_id, priority, size_hint, call.request_id, policy, min_tokens
    )
    return facts, payload


def generate_facts(
    payload: bytes, call: Call, resolve: Resolve
) -> tuple[RequestFacts, bytes, bool]:
    """The routing facts of a GenerateRequest, the payload to forward, and whether the
    stream may move to another worker if its worker fails mid-stream."""
    try:
        req = inference_pb2.GenerateRequest.FromString(payload)
    except DecodeError as exc:
        raise InvalidArgument("GenerateRequest could not be decoded", field="request") from exc
    # Expected work relative to a default-sized request: routing weighs measured
    # service time by it.
    max_tokens = req.sampling.max_tokens or DEFAULT_MAX_TOKENS
    # A text prompt is at least one token: route to a worker whose KV cache per
    # sequence can hold the request (when the fleet's differ).
    need = max_tokens + max(1, len(req.prompt_token_ids))
    facts, payload = _facts(
        call,
        resolve,
        payload,
        req.model,
        req.request_id,
        session_id=req.session_id,
        priority=int(req.priority),
        size_hint=max_tokens / DEFAULT_MAX_TOKENS,
        min_tokens=need,
    )
    return facts, payload, not req.disable_migration


def infer_facts(payload: bytes, call: Call, resolve: Resolve) -> tuple[RequestFacts, bytes]:
    try:
        req = inference_pb2.InferRequest.FromString(payload)
    except DecodeError as exc:
        raise InvalidArgument("InferRequest could not be decoded", field="request") from exc
    return _facts(call, resolve, payload, req.model, req.request_id, priority=int(req.priority))


def forward_metadata(call: Call) -> Metadata:
    """What the worker gets: the request id, and the caller's trace context."""
    rid = (REQUEST_ID_KEY, call.request_id)
    md = call.metadata
    if TRACEPARENT_KEY not in md:  # the common case: nothing else to pass on
        return (rid,)
    return (rid, *((k, md[k]) for k in (TRACEPARENT_KEY, TRACESTATE_KEY) if k in md))


_STATE_ORDER = (
    types_pb2.MODEL_STATE_READY,
    types_pb2.MODEL_STATE_LOADING,
    types_pb2.MODEL_STATE_UNLOADING,
    types_pb2.MODEL_STATE_FAILED,
)


def to_list_models_response(
    workers: Iterable[WorkerRecord], model: str = ""
) -> inference_pb2.ListModelsResponse:
    """The fleet view: each model with its replicas; READY if any replica is."""
    by_model: dict[str, inference_pb2.ModelStatus] = {}
    for worker in sorted(workers, key=lambda w: w.worker_id):
        draining = worker.state is WorkerState.DRAINING
        for m in worker.models:
            if model and m.name != model:
                continue
            status_pb = by_model.setdefault(
                m.name,
                inference_pb2.ModelStatus(
                    name=m.name,
                    kind=wire.MODEL_KIND_TO_PB[m.kind],
                    backend=m.backend,
                    state=types_pb2.MODEL_STATE_UNSPECIFIED,
                ),
            )
            state = m.state
            if draining and state is ModelState.READY:
                state = ModelState.UNLOADING
            status_pb.replicas.append(
                inference_pb2.ModelReplica(
                    worker_id=worker.worker_id,
                    address=worker.address,
                    state=wire.MODEL_STATE_TO_PB[state],
                    device=worker.device.label,
                    error=m.error,
                    max_concurrency=m.max_concurrency,
                    kv_cache_tokens=m.kv_cache_tokens,
                    max_sequence_length=m.max_sequence_length,
                )
            )
    for status_pb in by_model.values():
        states = {r.state for r in status_pb.replicas}
        status_pb.state = next((s for s in _STATE_ORDER if s in states), status_pb.state)
    return inference_pb2.ListModelsResponse(models=[by_model[name] for name in sorted(by_model)])
