"""gRPC edge of the gateway. Generate/Infer payloads are relayed as bytes: the
gateway decodes a request only to read its routing facts and never re-encodes it."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from gateway.relay import coalesce
from gateway.router import Router, RoutingFacts
from meshserve import status, wire
from meshserve.errors import InvalidArgument
from meshserve.grpc_server import INFERENCE_SERVICE
from meshserve.metadata import POLICY_KEY, REQUEST_ID_KEY, WORKER_ID_KEY
from meshserve.v1 import inference_pb2, types_pb2
from meshserve.vocab import ModelState
from registry.view import RegistryView

log = logging.getLogger(__name__)

# Caller metadata worth passing on to the worker (tracing context).
_PROPAGATE = ("traceparent", "tracestate")

# grpc ships no type hints: contexts are untyped (grpc.aio.ServicerContext at run time).
Ctx: TypeAlias = Any

_DEFAULT_MAX_TOKENS = 16  # the API's default (SamplingParams.max_tokens)

# Request ids for calls that bring none: 128 random bits as 32 hex digits, like
# uuid4().hex (an id, not a secret) at a tenth of its cost (no getrandom syscall).
_ids = random.Random()


_READ = frozenset({REQUEST_ID_KEY, POLICY_KEY, *_PROPAGATE})


def _read_metadata(context: Ctx) -> dict[str, str]:
    """The caller metadata the gateway uses, in one pass (this is the per-call path)."""
    found: dict[str, str] = {}
    for item in context.invocation_metadata() or ():
        if item.key in _READ and item.key not in found:
            v = item.value
            found[item.key] = v.decode() if isinstance(v, bytes) else str(v)
    return found


def _model_field(name: str) -> bytes:
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


class GatewayServicer:
    def __init__(self, router: Router, view: RegistryView) -> None:
        self._router = router
        self._view = view

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            INFERENCE_SERVICE,
            {
                # No request deserializer / response serializer: bytes in, bytes out.
                "Generate": grpc.unary_stream_rpc_method_handler(self.generate),
                "Infer": grpc.unary_unary_rpc_method_handler(self.infer),
                "ListModels": grpc.unary_unary_rpc_method_handler(
                    self.list_models,
                    request_deserializer=inference_pb2.ListModelsRequest.FromString,
                    response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
                ),
            },
        )

    def _facts(
        self,
        model: str,
        request_id: str,
        context: Ctx,
        payload: bytes,
        session_id: str = "",
        priority: int = 0,
        size_hint: float = 1.0,
        min_tokens: int = 0,
    ) -> tuple[RoutingFacts, bytes, tuple[tuple[str, str], ...]]:
        """Routing facts, the payload to forward and the metadata to send the worker.
        Built once per call (this is the per-call path: a frozen dataclass costs ~1 us)."""
        if not model:
            raise InvalidArgument("model is required")
        md = _read_metadata(context)
        rid = request_id or md.get(REQUEST_ID_KEY) or f"{_ids.getrandbits(128):032x}"
        target = self._router.resolve(model)
        if target != model:
            payload = payload + _model_field(target)
        if md:
            forward = ((REQUEST_ID_KEY, rid), *((k, md[k]) for k in _PROPAGATE if md.get(k)))
        else:  # the common case: nothing to propagate but the request id
            forward = ((REQUEST_ID_KEY, rid),)
        policy = md.get(POLICY_KEY, "") if md else ""
        facts = RoutingFacts(target, rid, session_id, priority, size_hint, policy, min_tokens)
        return facts, payload, forward

    async def generate(self, payload: bytes, context: Ctx) -> AsyncIterator[bytes]:
        try:
            try:
                req = inference_pb2.GenerateRequest.FromString(payload)
            except DecodeError as exc:
                raise InvalidArgument("GenerateRequest could not be decoded") from exc
            # Expected work relative to a default-sized request: routing weighs
            # measured service time by it.
            max_tokens = req.sampling.max_tokens or _DEFAULT_MAX_TOKENS
            size = max_tokens / _DEFAULT_MAX_TOKENS
            # A text prompt is at least one token: route to a worker whose KV cache
            # per sequence can hold the request (when the fleet's differ).
            need = max_tokens + max(1, len(req.prompt_token_ids))
            facts, payload, forward = self._facts(
                req.model,
                req.request_id,
                context,
                payload,
                req.session_id,
                int(req.priority),
                size,
                need,
            )

            async def commit(worker_id: str) -> None:
                # Trailing, not initial: an initial-metadata send is a write of its own.
                context.set_trailing_metadata(((WORKER_ID_KEY, worker_id),))

            stream = self._router.generate(
                facts,
                payload,
                time_remaining=context.time_remaining,  # None or >= 0 (grpc clamps)
                metadata=forward,
                on_commit=commit,
            )
            async for chunk in coalesce(stream):
                yield chunk
        except Exception as exc:
            await status.abort(context, exc)

    async def infer(self, payload: bytes, context: Ctx) -> bytes:
        try:
            try:
                req = inference_pb2.InferRequest.FromString(payload)
            except DecodeError as exc:
                raise InvalidArgument("InferRequest could not be decoded") from exc
            facts, payload, forward = self._facts(
                req.model, req.request_id, context, payload, priority=int(req.priority)
            )
            resp, worker_id = await self._router.infer(
                facts,
                payload,
                time_remaining=context.time_remaining,  # None or >= 0 (grpc clamps)
                metadata=forward,
            )
            context.set_trailing_metadata(((WORKER_ID_KEY, worker_id),))
            return resp
        except Exception as exc:
            await status.abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def list_models(
        self, request: inference_pb2.ListModelsRequest, context: Ctx
    ) -> inference_pb2.ListModelsResponse:
        """The fleet view: each model with its replicas; READY if any replica is."""
        by_model: dict[str, inference_pb2.ModelStatus] = {}
        for worker in sorted(self._view.workers.values(), key=lambda w: w.worker_id):
            draining = worker.state.value == "draining"
            for m in worker.models:
                if request.model and m.name != request.model:
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
            for candidate in (
                types_pb2.MODEL_STATE_READY,
                types_pb2.MODEL_STATE_LOADING,
                types_pb2.MODEL_STATE_UNLOADING,
                types_pb2.MODEL_STATE_FAILED,
            ):
                if candidate in states:
                    status_pb.state = candidate
                    break
        if request.model and request.model not in by_model:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served by any worker"
            )
        return inference_pb2.ListModelsResponse(
            models=[by_model[name] for name in sorted(by_model)]
        )
