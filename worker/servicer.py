"""gRPC edge of the worker: meshserve.v1.Inference over the models of a ModelHost."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from meshserve import load, status, wire
from meshserve.coalesce import coalesce
from meshserve.metadata import REQUEST_ID_KEY, WORKER_ID_KEY, metadata_value
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from meshserve.vocab import ModelKind, ModelState
from worker import convert
from worker.host import ModelHost
from worker.types import DEFAULT_MAX_TOKENS, GenerateChunk

log = logging.getLogger(__name__)


def _request_id(pb_id: str, context: grpc.aio.ServicerContext) -> str:
    return pb_id or metadata_value(context, REQUEST_ID_KEY) or convert.new_request_id()


def merge_chunks(chunks: list[GenerateChunk]) -> GenerateChunk:
    """Consecutive chunks as one: text and tokens joined, the last one's finish."""
    last = chunks[-1]
    return GenerateChunk(
        text="".join(c.text for c in chunks),
        token_ids=tuple(t for c in chunks for t in c.token_ids),
        finish=last.finish,
        usage=last.usage,
        queue_s=last.queue_s,
    )


class WorkerServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, host: ModelHost, *, worker_id: str, address: str) -> None:
        self._host = host
        self._worker_id = worker_id
        self._address = address
        self._worker_md = (WORKER_ID_KEY, worker_id)

    def _trailer(self, cost: load.CallCost | None = None) -> tuple[tuple[str, str | bytes], ...]:
        """Who served the call and the load after it. Trailing metadata only: an
        explicit initial-metadata send would cost a write of its own per call."""
        data = load.encode(self._host.load_snapshot(), cost)
        return (self._worker_md, (load.LOAD_KEY, data), (load.ORCA_KEY, data))

    async def Generate(
        self,
        request: inference_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        request_id = _request_id(request.request_id, context)
        try:
            gen_input = convert.to_generate_input(request, request_id)
            with self._host.admit(gen_input.model, ModelKind.GENERATE) as backend:
                start = time.monotonic()
                last = None
                # Chunks the engine produced while a write was in flight go out as one
                # message: fewer writes per token here and at every hop downstream.
                stream = coalesce(backend.generate(gen_input), merge_chunks)
                try:
                    async for chunk in stream:
                        last = chunk
                        yield convert.to_pb_chunk(chunk, request_id)
                finally:
                    # Runs on client cancel too (GeneratorExit/CancelledError): the
                    # engine must stop working on this request now.
                    await stream.aclose()  # type: ignore[attr-defined]  # coalesce's generator
                cost = None
                if last is not None and last.usage is not None:
                    # Work in units of a default-sized (16-token) generation.
                    work = max(last.usage.completion_tokens, 1) / DEFAULT_MAX_TOKENS
                    cost = load.CallCost(time.monotonic() - start - last.queue_s, work)
            context.set_trailing_metadata(self._trailer(cost))
        except Exception as exc:
            log.debug("generate %s failed: %r", request_id, exc)
            await status.abort(context, exc)

    async def Infer(
        self,
        request: inference_pb2.InferRequest,
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.InferResponse:
        request_id = _request_id(request.request_id, context)
        try:
            infer_input = convert.to_infer_input(request, request_id)
            with self._host.admit(infer_input.model, ModelKind.INFER) as backend:
                start = time.monotonic()
                out = await backend.infer(infer_input)
                cost = load.CallCost(time.monotonic() - start - out.queue_s, out.work or 1.0)
            context.set_trailing_metadata(self._trailer(cost))
            return convert.to_pb_infer_response(out, model=request.model, request_id=request_id)
        except Exception as exc:
            await status.abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort always raises

    def _capacity(self, name: str, state: ModelState) -> dict[str, int]:
        if state is not ModelState.READY:
            return {}
        return {
            "max_concurrency": self._host.model_slots(name),
            "kv_cache_tokens": self._host.model_kv_tokens(name),
            "max_sequence_length": self._host.model_max_sequence(name),
        }

    async def ListModels(
        self,
        request: inference_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext,
    ) -> inference_pb2.ListModelsResponse:
        resp = inference_pb2.ListModelsResponse()
        for st in self._host.statuses():
            if request.model and st.spec.name != request.model:
                continue
            state = wire.MODEL_STATE_TO_PB[st.state]
            resp.models.append(
                inference_pb2.ModelStatus(
                    name=st.spec.name,
                    kind=wire.MODEL_KIND_TO_PB[st.spec.kind],
                    state=state,
                    backend=st.spec.backend,
                    replicas=[
                        inference_pb2.ModelReplica(
                            worker_id=self._worker_id,
                            address=self._address,
                            state=state,
                            device=self._host.device.label,
                            error=st.error,
                            **self._capacity(st.spec.name, st.state),
                        )
                    ],
                )
            )
        return resp
