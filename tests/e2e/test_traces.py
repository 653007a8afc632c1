"""One trace across a real gateway process and a real worker process, exported over
OTLP to a collector that keeps the spans in memory (this test's own gRPC server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from meshserve.etcd_process import EtcdProcess, free_port
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from tests.procs import processes, wait_models

pytestmark = pytest.mark.e2e

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@dataclass(frozen=True)
class SpanRec:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: every exported span, in memory."""

    def __init__(self) -> None:
        self.spans: list[SpanRec] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            service = next(
                a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        SpanRec(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                s.parent_span_id.hex())
                    )  # fmt: skip
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    c = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)  # type: ignore[no-untyped-call]
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    try:
        yield c, address
    finally:
        await server.stop(None)


def _one(spans: list[SpanRec], service: str, name: str) -> SpanRec:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, f"{service}/{name}: {found} among {spans}"
    return found[0]


@pytest.mark.timeout(120)
async def test_one_trace_from_the_client_through_gateway_worker_and_engine(
    etcd: EtcdProcess, tmp_path: Path, collector: tuple[Collector, str]
) -> None:
    col, endpoint = collector
    env = {
        "MESHSERVE_OTLP_ENDPOINT": endpoint,
        "MESHSERVE_TRACE_SAMPLE_RATIO": "0",  # roots never: only the client's trace
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    async with processes(tmp_path, **env) as procs:
        procs.spawn(
            "worker",
            ["worker", "--etcd", etcd.endpoint, "--worker-id", "w1", "--fake", "fake-gen",
             "--fake-option", "per_request_ms=5", "--fake-option", "per_token_ms=1"],
            metrics=False,
        )  # fmt: skip
        gateway = procs.spawn("gateway", ["gateway", "--etcd", etcd.endpoint], metrics=False)
        await wait_models(gateway, ["fake-gen"])
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            req = inference_pb2.GenerateRequest(
                model="fake-gen", prompt="hi", sampling=inference_pb2.SamplingParams(max_tokens=4)
            )
            traced = (("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),)
            msgs = [
                m
                async for m in inference_pb2_grpc.InferenceStub(ch).Generate(
                    req, metadata=traced, timeout=10
                )
            ]
            assert msgs[-1].usage.completion_tokens == 4
            # Not sampled by the caller, and no root sampling: no spans for these.
            untraced = (("traceparent", f"00-{'1' * 32}-{'2' * 16}-00"),)
            _ = [
                m
                async for m in inference_pb2_grpc.InferenceStub(ch).Generate(
                    req, metadata=untraced, timeout=10
                )
            ]
            health = health_pb2_grpc.HealthStub(ch)
            await health.Check(health_pb2.HealthCheckRequest(), metadata=traced, timeout=5)
    # The processes are stopped: each flushed its spans on the way out.
    spans = col.spans
    assert spans and {s.trace_id for s in spans} == {TRACE_ID}
    gw = _one(spans, "meshserve-gateway", "meshserve.v1.Generate")
    assert gw.parent == CLIENT_SPAN
    schedule = _one(spans, "meshserve-gateway", "schedule")
    forward = _one(spans, "meshserve-gateway", "forward")
    ttft = _one(spans, "meshserve-gateway", "time_to_first_token")
    assert schedule.parent == forward.parent == gw.span_id
    assert ttft.parent == forward.span_id
    wk = _one(spans, "meshserve-worker", "meshserve.v1.Generate")
    assert wk.parent == forward.span_id  # the worker continued the gateway's context
    for name in ("engine.queue", "engine.prefill", "engine.decode"):
        assert _one(spans, "meshserve-worker", name).parent == wk.span_id
    # Health checks, reflection and etcd calls are not traced.
    assert not [s for s in spans if "Health" in s.name or "etcd" in s.name.lower()]
