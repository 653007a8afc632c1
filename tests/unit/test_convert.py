"""Converters between protobuf and worker dataclasses: round trips and validation."""

from __future__ import annotations

import numpy as np
import pytest

from meshserve.errors import InvalidArgument
from meshserve.v1 import inference_pb2
from worker import convert
from worker.types import DType, FinishReason, GenerateChunk, TensorData, Usage


def _req(**kw: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]


def test_generate_defaults() -> None:
    gi = convert.to_generate_input(_req(model="m", prompt="hi"), "r1")
    assert gi.prompt == "hi" and gi.prompt_token_ids is None
    assert gi.sampling.max_tokens == 16
    assert gi.sampling.temperature == 1.0 and gi.sampling.top_p == 1.0
    assert gi.sampling.top_k == 0 and gi.sampling.seed is None


def test_generate_explicit_zero_temperature_is_greedy_not_default() -> None:
    sp = inference_pb2.SamplingParams(max_tokens=5, temperature=0.0, seed=0, stop=["x"])
    gi = convert.to_generate_input(_req(model="m", prompt_token_ids=[1, 2], sampling=sp), "r")
    assert gi.sampling.temperature == 0.0
    assert gi.sampling.seed == 0
    assert gi.prompt_token_ids == (1, 2) and gi.prompt is None
    assert gi.sampling.stop == ("x",)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"prompt": "x"}, "model is required"),
        ({"model": "m"}, "exactly one"),
        ({"model": "m", "prompt": "a", "prompt_token_ids": [1]}, "exactly one"),
        (
            {"model": "m", "prompt": "a", "sampling": inference_pb2.SamplingParams(top_p=0.0)},
            "top_p",
        ),
        (
            {
                "model": "m",
                "prompt": "a",
                "sampling": inference_pb2.SamplingParams(temperature=-1.0),
            },
            "temperature",
        ),
        (
            {"model": "m", "prompt": "a", "sampling": inference_pb2.SamplingParams(stop=[""])},
            "stop",
        ),
        (
            {
                "model": "m",
                "prompt": "a",
                "sampling": inference_pb2.SamplingParams(max_tokens=10**6),
            },
            "max_tokens",
        ),
    ],
)
def test_generate_rejects_bad_requests(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        convert.to_generate_input(_req(**kw), "r")


def test_chunk_to_pb() -> None:
    last = GenerateChunk("b", (7,), FinishReason.STOP, Usage(3, 2))
    pb = convert.to_pb_chunk(last, "rid")
    assert pb.request_id == "rid" and pb.text == "b" and list(pb.token_ids) == [7]
    assert pb.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert (pb.usage.prompt_tokens, pb.usage.completion_tokens) == (3, 2)
    mid = convert.to_pb_chunk(GenerateChunk("a", (5,)), "rid")
    assert mid.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED
    assert not mid.HasField("usage")


@pytest.mark.parametrize(
    ("dtype", "np_dtype"),
    [
        (DType.FP32, "<f4"),
        (DType.FP16, "<f2"),
        (DType.INT64, "<i8"),
        (DType.UINT8, "u1"),
        (DType.BOOL, "?"),
        (DType.FP64, "<f8"),
    ],
)
def test_numeric_tensor_round_trip(dtype: DType, np_dtype: str) -> None:
    arr = (np.arange(6).reshape(2, 3) % 2).astype(np_dtype)
    pb = convert.to_pb_tensor(TensorData("x", dtype, (2, 3), array=arr))
    back = convert.to_tensor(pb)
    assert back.dtype is dtype and back.shape == (2, 3)
    assert back.array is not None
    np.testing.assert_array_equal(back.array, arr)


def test_string_and_bytes_tensors_round_trip() -> None:
    s = convert.to_tensor(
        convert.to_pb_tensor(TensorData("t", DType.STRING, (2,), elements=("a", "é")))
    )
    assert s.elements == ("a", "é")
    b = convert.to_tensor(
        convert.to_pb_tensor(TensorData("b", DType.BYTES, (1,), elements=(b"\x00",)))
    )
    assert b.elements == (b"\x00",)


def test_tensor_size_mismatch_is_invalid_argument() -> None:
    pb = inference_pb2.Tensor(
        name="x", dtype=inference_pb2.DATA_TYPE_FP32, shape=[2, 2], raw_contents=b"\x00" * 12
    )
    with pytest.raises(InvalidArgument, match="needs 16 bytes"):
        convert.to_tensor(pb)
    pb2 = inference_pb2.Tensor(name="t", dtype=inference_pb2.DATA_TYPE_STRING, shape=[3])
    with pytest.raises(InvalidArgument, match="needs 3 string_contents"):
        convert.to_tensor(pb2)
    with pytest.raises(InvalidArgument, match="dtype"):
        convert.to_tensor(inference_pb2.Tensor(name="q", shape=[1]))
