"""A vLLM-compatible demo model: Llama-shaped, random weights, the demo tokenizer.

vLLM's CPU attention supports head sizes of 32 and up (the torch demo model has 16),
so this model keeps `tiny-llama`'s locally trained tokenizer and vocabulary and swaps
the network for one with 64-wide heads. Nothing is downloaded; the same seed gives
the same files.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

from meshserve.demo import TINY_LLAMA, make_demo
from meshserve.vocab import ModelKind
from worker.model_repo import SPEC_FILENAME, load_spec, write_spec
from worker.types import ModelSpec

VLLM_TINY_LLAMA = "tiny-llama-vllm"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_vllm_demo(
    models_dir: Path,
    *,
    name: str = VLLM_TINY_LLAMA,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
    max_concurrency: int = 32,
    options: dict[str, str] | None = None,
    seed: int = 0,
    force: bool = False,
) -> ModelSpec:
    """Build `<models_dir>/<name>` (backend "vllm") and return its spec as a worker reads it.

    Head size is hidden_size / num_heads (64 by default). `options` go to the spec
    (see worker.backends.vllm for the keys). An existing model is kept unless `force`.
    """
    models_dir = Path(models_dir)
    model_dir = models_dir / name
    if (model_dir / SPEC_FILENAME).exists() and not force:
        return load_spec(models_dir, name)
    make_demo(models_dir, seed=seed)  # the tokenizer (kept when already there)
    model_dir.mkdir(parents=True, exist_ok=True)
    for fname in _TOKENIZER_FILES:
        src = models_dir / TINY_LLAMA / fname
        if src.exists():
            shutil.copyfile(src, model_dir / fname)

    import torch

    transformers: Any = importlib.import_module("transformers")
    transformers.utils.logging.disable_progress_bar()
    base = transformers.AutoConfig.from_pretrained(
        str(models_dir / TINY_LLAMA), local_files_only=True
    )
    config = transformers.LlamaConfig(
        vocab_size=base.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
    )
    model.save_pretrained(str(model_dir))
    spec = ModelSpec(
        name=name,
        kind=ModelKind.GENERATE,
        backend="vllm",
        path=str(model_dir.resolve()),
        max_concurrency=max_concurrency,
        options=dict(options or {}),
    )
    write_spec(models_dir, spec)  # last: its presence means the directory is complete
    return load_spec(models_dir, name)
