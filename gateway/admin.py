"""gRPC edge of meshserve.v1.Admin on the gateway: operator questions, read-only.
Each handler converts, asks one domain object (health, fleet snapshot, router) and
converts back."""

from __future__ import annotations

import grpc

from gateway.convert import DEFAULT_MAX_TOKENS
from gateway.fleet import TrafficMeter, WorkerView, explain_route, fleet_snapshot
from gateway.health import GatewayHealth
from gateway.router import Router
from gateway.routing import FleetView, RouteExplanation
from gateway.scheduler.types import RequestFacts
from meshserve import __version__, wire
from meshserve.edge import Call, Edge, generic_handler
from meshserve.errors import InvalidArgument
from meshserve.v1 import admin_pb2
from meshserve.vocab import ModelKind, ModelState, WorkerState

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def to_worker_status(w: WorkerView) -> admin_pb2.WorkerStatus:
    pb = admin_pb2.WorkerStatus(
        worker_id=w.worker_id,
        address=w.address,
        device=w.device,
        device_name=w.device_name,
        state=wire.WORKER_STATE_TO_PB[WorkerState(w.state)],
        capacity=w.capacity,
        inflight_estimate=w.inflight_estimate,
        gateway_inflight=w.gateway_inflight,
        queue_depth=w.queue_depth,
        slots=w.slots,
        kv_cache_use=w.kv_cache_use,
        report_age_seconds=w.report_age_s,
        error_rate=w.error_rate,
        traffic_share=w.traffic_share,
        ejected=w.ejected,
        version=w.version,
        labels=dict(w.labels),
        models=[
            admin_pb2.WorkerModelStatus(
                name=m.name,
                kind=wire.MODEL_KIND_TO_PB[ModelKind(m.kind)],
                state=wire.MODEL_STATE_TO_PB[ModelState(m.state)],
                backend=m.backend,
                service_time_seconds=m.service_time_s,
                ttft_seconds=m.ttft_s,
            )
            for m in w.models
        ],
    )
    pb.start_time.FromDatetime(w.start_time)
    return pb


def to_route_facts(req: admin_pb2.ExplainRouteRequest) -> RequestFacts:
    if not req.model:
        raise InvalidArgument("model is required", field="model")
    max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
    return RequestFacts(
        req.model,
        req.session_id,
        int(req.priority),
        max_tokens / DEFAULT_MAX_TOKENS,
        policy=req.policy,
        min_tokens=max_tokens + max(1, req.prompt_tokens),
    )


def to_explain_response(e: RouteExplanation) -> admin_pb2.ExplainRouteResponse:
    ranked = [c for c in e.candidates if c.rank is not None]
    return admin_pb2.ExplainRouteResponse(
        model=e.model,
        policy=e.policy,
        chosen_worker=ranked[0].worker_id if ranked else "",
        candidates=[
            admin_pb2.CandidateExplanation(
                worker_id=c.worker_id,
                rank=-1 if c.rank is None else c.rank,
                filtered_by=c.filtered_by,
                inputs=dict(c.inputs),
                scores=dict(c.scores),
                predicted_completion_seconds=c.predicted_completion_s,
                ejected=c.worker_id in e.ejected,
                too_short=c.worker_id in e.too_short,
            )
            for c in e.candidates
        ],
    )


class AdminServicer:
    def __init__(self, router: Router, view: FleetView, health: GatewayHealth, policy: str) -> None:
        self._router = router
        self._view = view
        self._health = health
        self._policy = policy
        self._meter = TrafficMeter()

    def handler(self, edge: Edge) -> grpc.GenericRpcHandler:
        pb = admin_pb2
        return generic_handler(
            ADMIN_SERVICE,
            {
                "GetStatus": edge.unary(
                    "GetStatus",
                    self.get_status,
                    decode=pb.GetStatusRequest.FromString,
                    response_serializer=pb.GetStatusResponse.SerializeToString,
                ),
                "ListWorkers": edge.unary(
                    "ListWorkers",
                    self.list_workers,
                    decode=pb.ListWorkersRequest.FromString,
                    response_serializer=pb.ListWorkersResponse.SerializeToString,
                ),
                "ExplainRoute": edge.unary(
                    "ExplainRoute",
                    self.explain_route,
                    decode=pb.ExplainRouteRequest.FromString,
                    response_serializer=pb.ExplainRouteResponse.SerializeToString,
                ),
            },
        )

    async def get_status(
        self, request: admin_pb2.GetStatusRequest, call: Call
    ) -> admin_pb2.GetStatusResponse:
        st = self._health.status()
        return admin_pb2.GetStatusResponse(
            serving=st.serving,
            detail=st.detail,
            registry_connected=st.registry_connected,
            registry_view_age_seconds=-1.0 if st.view_age_s is None else st.view_age_s,
            registry_error=st.registry_error,
            workers=st.workers,
            ready_models=list(st.ready_models),
            version=__version__,
            policy=self._policy,
        )

    async def list_workers(
        self, request: admin_pb2.ListWorkersRequest, call: Call
    ) -> admin_pb2.ListWorkersResponse:
        snapshot = fleet_snapshot(self._view.workers, self._router, self._meter)
        return admin_pb2.ListWorkersResponse(workers=[to_worker_status(w) for w in snapshot])

    async def explain_route(
        self, request: admin_pb2.ExplainRouteRequest, call: Call
    ) -> admin_pb2.ExplainRouteResponse:
        call.model = request.model
        return to_explain_response(explain_route(self._router, to_route_facts(request)))
