"""gRPC edge of the gateway. Generate/Infer payloads are relayed as bytes: the gateway
decodes a request only to read its routing facts and never re-encodes it. Errors become
statuses in the edge (meshserve.edge), not here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from gateway import convert
from gateway.resume import Resume
from gateway.router import Router
from gateway.routing import FleetView
from meshserve.edge import Call, Edge, generic_handler
from meshserve.errors import NotFound
from meshserve.grpc_server import INFERENCE_SERVICE
from meshserve.metadata import WORKER_ID_KEY
from meshserve.relay import coalesce
from meshserve.v1 import inference_pb2


class GatewayServicer:
    def __init__(self, router: Router, view: FleetView) -> None:
        self._router = router
        self._view = view

    def handler(self, edge: Edge) -> grpc.GenericRpcHandler:
        return generic_handler(
            INFERENCE_SERVICE,
            {
                # No request deserializer / response serializer: bytes in, bytes out.
                "Generate": edge.stream("Generate", self.generate),
                "Infer": edge.unary("Infer", self.infer),
                "ListModels": edge.unary(
                    "ListModels",
                    self.list_models,
                    decode=inference_pb2.ListModelsRequest.FromString,
                    response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
                ),
            },
        )

    async def generate(self, payload: bytes, call: Call) -> AsyncIterator[bytes]:
        facts, payload, movable = convert.generate_facts(payload, call, self._router.resolve)

        def commit(worker_id: str) -> None:
            # Trailing, not initial: an initial-metadata send is a write of its own.
            call.worker_id = worker_id
            call.set_trailers(((WORKER_ID_KEY, worker_id),))

        stream = self._router.generate(
            facts,
            payload,
            time_remaining=call.time_remaining,  # None or >= 0 (grpc clamps)
            metadata=convert.forward_metadata(call),
            on_commit=commit,
            resume=Resume(payload) if movable and self._router.migrates else None,
        )
        async for chunk in coalesce(stream):
            yield chunk

    async def infer(self, payload: bytes, call: Call) -> bytes:
        facts, payload = convert.infer_facts(payload, call, self._router.resolve)
        resp, worker_id = await self._router.infer(
            facts,
            payload,
            time_remaining=call.time_remaining,
            metadata=convert.forward_metadata(call),
        )
        call.worker_id = worker_id
        call.set_trailers(((WORKER_ID_KEY, worker_id),))
        return resp

    async def list_models(
        self, request: inference_pb2.ListModelsRequest, call: Call
    ) -> inference_pb2.ListModelsResponse:
        resp = convert.to_list_models_response(self._view.workers.values(), request.model)
        if request.model and not resp.models:
            raise NotFound(
                f"model {request.model!r} is not served by any worker",
                metadata={"model": request.model},
                field="model",
            )
        return resp
