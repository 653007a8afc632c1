"""Prometheus metrics scraped from a real gateway and a real worker process."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from tests.procs import Proc, processes, wait_models

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(proc: Proc) -> Samples:
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _gen(model: str, n: int, **kw: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model,
        prompt="hi",
        sampling=inference_pb2.SamplingParams(max_tokens=n, ignore_eos=True, **kw),  # type: ignore[arg-type]
    )


async def _drive(stub: inference_pb2_grpc.InferenceStub) -> None:
    for _ in range(3):
        assert len([m async for m in stub.Generate(_gen("fake-gen", 5), timeout=10)]) >= 1
    x = np.ones(4, dtype="<f4")
    tensor = inference_pb2.Tensor(
        name="x", dtype=inference_pb2.DATA_TYPE_FP32, shape=[4], raw_contents=x.tobytes()
    )
    for _ in range(2):
        await stub.Infer(inference_pb2.InferRequest(model="fake-echo", inputs=[tensor]), timeout=10)
    for bad, code in (
        (_gen("no-such-model", 5), grpc.StatusCode.NOT_FOUND),
        (_gen("fake-gen", 5, top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(bad, timeout=10):
                pass
        assert info.value.code() == code


@pytest.mark.timeout(120)
async def test_gateway_and_worker_metrics_count_what_happened(
    etcd: EtcdProcess, tmp_path: Path
) -> None:
    async with processes(tmp_path) as procs:
        worker = procs.spawn(
            "worker",
            ["worker", "--etcd", etcd.endpoint, "--worker-id", "w1",
             "--fake", "fake-gen", "--fake", "fake-echo:infer",
             "--fake-option", "per_request_ms=1", "--fake-option", "per_token_ms=1"],
        )  # fmt: skip
        gateway = procs.spawn("gateway", ["gateway", "--etcd", etcd.endpoint])
        await wait_models(gateway, ["fake-gen", "fake-echo"])
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            await _drive(inference_pb2_grpc.InferenceStub(ch))
        gw, wk = scrape(gateway), scrape(worker)

    name = "meshserve_gateway_requests_total"
    assert value(gw, name, method="Generate", model="fake-gen", code="OK") == 3
    assert value(gw, name, method="Infer", model="fake-echo", code="OK") == 2
    # A model nobody serves is counted, under a bounded label value.
    assert value(gw, name, method="Generate", model="other", code="NOT_FOUND") == 1
    assert value(gw, name, method="Generate", model="fake-gen", code="INVALID_ARGUMENT") == 1
    assert value(gw, "meshserve_gateway_tokens_streamed_total", model="fake-gen") == 15
    assert value(gw, "meshserve_gateway_worker_picks_total", worker="w1") == 6
    assert value(gw, "meshserve_gateway_time_to_first_token_seconds_count", model="fake-gen") == 3
    assert value(gw, "meshserve_gateway_inter_token_seconds_count", model="fake-gen") == 3
    assert value(gw, "meshserve_gateway_routing_decision_seconds_count") == 6
    assert value(gw, "meshserve_gateway_open_streams") == 0
    assert value(gw, "meshserve_gateway_workers", state="serving") == 1
    assert value(gw, "meshserve_gateway_model_ready_replicas", model="fake-gen") == 1
    assert value(gw, "meshserve_gateway_registry_connected") == 1
    assert 0 <= value(gw, "meshserve_gateway_registry_view_age_seconds") < 30
    assert value(gw, "meshserve_gateway_queue_length", priority="normal") == 0
    assert value(gw, "process_cpu_seconds_total") > 0
    assert value(gw, "meshserve_registry_requests_total", op="list", outcome="ok") >= 1

    name = "meshserve_worker_requests_total"
    assert value(wk, name, method="Generate", model="fake-gen", code="OK") == 3
    assert value(wk, name, method="Infer", model="fake-echo", code="OK") == 2
    assert value(wk, "meshserve_worker_tokens_generated_total", model="fake-gen") == 15
    errors = "meshserve_worker_errors_total"
    labels = {"model": "fake-gen", "code": "INVALID_ARGUMENT", "reason": "INVALID_REQUEST"}
    assert value(wk, errors, **labels) == 1
    assert value(wk, "meshserve_worker_model_state", model="fake-gen", state="ready") == 1
    assert value(wk, "meshserve_worker_model_state", model="fake-gen", state="loading") == 0
    assert value(wk, "meshserve_worker_inflight", model="fake-gen") == 0
    assert value(wk, "meshserve_worker_prefill_seconds_count", model="fake-gen") == 3
    assert value(wk, "meshserve_worker_model_max_concurrency", model="fake-gen") > 0
    assert value(wk, "meshserve_registry_requests_total", op="lease_grant", outcome="ok") >= 1
    assert value(wk, "meshserve_registry_requests_total", op="put", outcome="ok") >= 1
