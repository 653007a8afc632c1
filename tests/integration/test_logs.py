"""Logs: JSON lines with the request id of the call being served; prompts and outputs
never logged unless asked for."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from meshserve import logs
from meshserve.edge import Call, current_call
from meshserve.etcd_process import EtcdProcess
from meshserve.v1 import inference_pb2
from tests.mesh import Mesh, running_mesh


class _Ctx:
    def invocation_metadata(self) -> list[object]:
        return []


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger as `logs.setup` leaves it, writing to a buffer."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    buf = io.StringIO()
    try:
        yield buf
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        logs.set_prompt_logging(False)


def _into(buf: io.StringIO, fmt: str, *, log_prompts: bool = False) -> None:
    logs.setup("info", fmt, log_prompts=log_prompts)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buf)


def test_json_lines_carry_the_request_id_of_the_call(captured: io.StringIO) -> None:
    _into(captured, "json")
    log = logging.getLogger("meshserve.test")
    log.info("outside any call")
    call = Call("Infer", _Ctx(), {"x-request-id": "rid-7"})
    token = current_call.set(call)
    try:
        log.warning("inside %s", "a call")
    finally:
        current_call.reset(token)
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["message"] == "outside any call" and "request_id" not in first
    assert second["request_id"] == "rid-7" and second["level"] == "WARNING"
    assert second["message"] == "inside a call" and "time" in second


def test_text_lines_name_the_request(captured: io.StringIO) -> None:
    _into(captured, "text")
    token = current_call.set(Call("Infer", _Ctx(), {"x-request-id": "rid-8"}))
    try:
        logging.getLogger("meshserve.test").info("hello")
    finally:
        current_call.reset(token)
    assert captured.getvalue().rstrip().endswith("hello [request_id=rid-8]")


@pytest.fixture
async def mesh(etcd: EtcdProcess, models_dir: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, models_dir, workers=1, models=("tiny-llama",)) as m:
        yield m


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompts_reach_the_log_only_when_asked_for(
    mesh: Mesh, captured: io.StringIO, log_prompts: bool
) -> None:
    _into(captured, "json", log_prompts=log_prompts)
    secret = "my confidential prompt 4711"
    req = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt=secret, sampling=inference_pb2.SamplingParams(max_tokens=3)
    )
    _ = [m async for m in mesh.client.stub.Generate(req, timeout=30)]
    bad = inference_pb2.GenerateRequest(
        model="tiny-llama", prompt=secret, sampling=inference_pb2.SamplingParams(top_p=7.0)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        _ = [m async for m in mesh.client.stub.Generate(bad, timeout=30)]
    assert (secret in captured.getvalue()) is log_prompts
