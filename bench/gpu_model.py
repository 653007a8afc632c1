"""The GPU check's model: a Llama-shaped causal LM with random weights, made locally.

The tokenizer is the demo's (meshserve/demo.py: byte-level BPE trained here on a seeded
corpus, about 2200 tokens), padded with plain added tokens `<x0>`, `<x1>`, ... up to the
model's vocabulary, so every id the model can produce decodes to text. Prompts are token
ids drawn from the trained BPE tokens; every request sets ignore_eos, so each stream
decodes its full max_tokens.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from meshserve.vocab import ModelKind
from worker.model_repo import write_spec
from worker.types import ModelSpec

MODEL_NAME = "gpu-llama"


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 2048

    def params(self) -> int:
        """Parameters of an untied Llama of this shape (embeddings, layers, norm, LM head)."""
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden  # two RMSNorms
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads / "
            f"{self.kv_heads} KV heads, intermediate {self.intermediate}, vocab {self.vocab}"
        )


# Llama's FFN rule for hidden 1024: 256 * ceil(8/3 * 1024 / 256) = 2816; Llama-2's vocab.
# 199.4M parameters (untied embeddings).
GPU_SHAPE = Shape(hidden=1024, layers=12, heads=16, kv_heads=4, intermediate=2816, vocab=32000)
SMALL_SHAPE = Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352, vocab=4096)


@dataclass
class BuiltModel:
    models_dir: Path
    spec: ModelSpec
    shape: Shape
    params: int
    bpe_vocab: int  # ids [first_id, bpe_vocab) are trained BPE tokens: prompts use these
    first_id: int
    model: Any  # in-process copy on the device, eval mode, EOS disabled
    dtype: torch.dtype

    def info(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "params": self.params,
            "shape": asdict(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "bpe_vocab": self.bpe_vocab,
            "max_concurrency": self.spec.max_concurrency,
            "options": dict(self.spec.options),
        }


def build_model(
    models_dir: Path,
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    *,
    max_concurrency: int,
    options: dict[str, str],
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> BuiltModel:
    """Write `<models_dir>/gpu-llama` (tokenizer, bf16 safetensors, spec) and return it
    with an in-process copy of the model on `device`."""
    from meshserve.demo import _build_tiny_llama

    transformers: Any = importlib.import_module("transformers")
    transformers.utils.logging.disable_progress_bar()
    model_dir = models_dir / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-tok-") as tmp:
        # The demo's own recipe (also makes a 2-layer toy model, which is discarded).
        _build_tiny_llama(Path(tmp), seed, lambda _msg: None)
        tok = transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    bpe_vocab = len(tok)
    if bpe_vocab > shape.vocab:
        raise RuntimeError(f"tokenizer has {bpe_vocab} tokens, more than vocab {shape.vocab}")
    tok.add_tokens([f"<x{i}>" for i in range(shape.vocab - bpe_vocab)])
    tok.save_pretrained(str(model_dir))
    bos, eos, pad = (tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>"))
    progress(f"tokenizer: {bpe_vocab} BPE tokens padded to {len(tok)}")

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_positions,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        with device:  # initialise on the device: seconds saved for 200M parameters
            model = transformers.LlamaForCausalLM(config)
    model.to(dtype).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad
    )
    params = sum(p.numel() for p in model.parameters())
    progress(f"model: {params / 1e6:.1f}M parameters ({shape.describe()}), {dtype}; saving")
    model.save_pretrained(str(model_dir))
    spec = ModelSpec(
        name=MODEL_NAME,
        kind=ModelKind.GENERATE,
        backend="torch",
        path=str(model_dir.resolve()),
        max_concurrency=max_concurrency,
        options=dict(options),
    )
    write_spec(models_dir, spec)  # last: a spec file means the directory is complete
    # The in-process references never stop early (the saved copy keeps its EOS).
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    first_id = len(("<s>", "</s>", "<unk>", "<pad>"))
    return BuiltModel(models_dir, spec, shape, params, bpe_vocab, first_id, model, dtype)


def make_prompts(built: BuiltModel, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` distinct prompts of `length` BPE token ids (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(built.first_id, built.bpe_vocab, (n, length), generator=gen)
    return [[int(x) for x in row] for row in ids]
