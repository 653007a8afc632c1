"""gRPC edge of the worker: meshserve.v1.Inference over the models of a ModelHost.
Errors become statuses in the edge (meshserve.edge), not here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from meshserve import load
from meshserve.edge import Call, Edge, generic_handler
from meshserve.grpc_server import INFERENCE_SERVICE
from meshserve.logs import prompt_logging
from meshserve.metadata import WORKER_ID_KEY
from meshserve.relay import coalesce_messages
from meshserve.v1 import inference_pb2
from worker import convert
from worker.host import ModelHost
from worker.types import GenerateChunk

log = logging.getLogger(__name__)


class WorkerServicer:
    def __init__(self, host: ModelHost, *, worker_id: str, address: str) -> None:
        self._host = host
        self._worker_id = worker_id
        self._address = address
        self._worker_md = (WORKER_ID_KEY, worker_id)

    def handler(self, edge: Edge) -> grpc.GenericRpcHandler:
        pb = inference_pb2
        return generic_handler(
            INFERENCE_SERVICE,
            {
                "Generate": edge.stream(
                    "Generate",
                    self.generate,
                    decode=pb.GenerateRequest.FromString,
                    response_serializer=pb.GenerateResponse.SerializeToString,
                ),
                "Infer": edge.unary(
                    "Infer",
                    self.infer,
                    decode=pb.InferRequest.FromString,
                    response_serializer=pb.InferResponse.SerializeToString,
                ),
                "ListModels": edge.unary(
                    "ListModels",
                    self.list_models,
                    decode=pb.ListModelsRequest.FromString,
                    response_serializer=pb.ListModelsResponse.SerializeToString,
                ),
            },
        )

    def _trailer(self, cost: load.CallCost | None = None) -> tuple[tuple[str, str | bytes], ...]:
        """Who served the call and the load after it. Trailing metadata only: an
        explicit initial-metadata send would cost a write of its own per call."""
        data = load.encode(self._host.load_snapshot(), cost)
        return (self._worker_md, (load.LOAD_KEY, data), (load.ORCA_KEY, data))

    async def generate(
        self, request: inference_pb2.GenerateRequest, call: Call
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call.request_id, call.model = request.request_id, request.model
        gen_input = convert.to_generate_input(request, call.request_id)
        last: list[GenerateChunk] = []
        logging_prompts = prompt_logging()  # never by default: prompts are the users' data
        if logging_prompts:
            log.info("generate prompt=%r ids=%s", gen_input.prompt, gen_input.prompt_token_ids)
        texts: list[str] = []

        async def messages() -> AsyncIterator[inference_pb2.GenerateResponse]:
            async for chunk in self._host.generate(gen_input):
                last[:] = (chunk,)
                if logging_prompts:
                    texts.append(chunk.text)
                yield convert.to_pb_chunk(chunk, gen_input.request_id, gen_input.resumed)

        # Messages made while a write was in flight go out as one: fewer writes per
        # token here and at every hop downstream.
        stream = coalesce_messages(messages())
        try:
            async for msg in stream:
                yield msg
        finally:
            # Runs on client cancel too: the engine must stop working on this request now.
            await stream.aclose()  # type: ignore[attr-defined]  # coalesce's generator
        if logging_prompts:
            log.info("generate output=%r", "".join(texts))
        call.set_trailers(
            self._trailer(convert.generate_cost(last, call.started, len(gen_input.continuation)))
        )

    async def infer(
        self, request: inference_pb2.InferRequest, call: Call
    ) -> inference_pb2.InferResponse:
        call.request_id, call.model = request.request_id, request.model
        infer_input = convert.to_infer_input(request, call.request_id)
        out = await self._host.infer(infer_input)
        call.set_trailers(self._trailer(convert.infer_cost(out, call.started)))
        return convert.to_pb_infer_response(out, model=request.model, request_id=call.request_id)

    async def list_models(
        self, request: inference_pb2.ListModelsRequest, call: Call
    ) -> inference_pb2.ListModelsResponse:
        return convert.to_list_models_response(
            self._host.statuses(), request.model, worker_id=self._worker_id, address=self._address,
            device=self._host.device.label,
        )  # fmt: skip
