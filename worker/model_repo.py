"""The model repository on disk: one directory per model, described by a JSON spec.

    <models_dir>/<name>/meshserve-model.json
    {"name": "tiny-llama", "kind": "generate", "backend": "torch", "path": ".",
     "package": null, "max_concurrency": 16, "options": {}}

Model names come from operators and clients, so a name is only ever joined into a
path after `valid_model_name` accepted it, and a spec's `path` must stay inside its
model's directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from meshserve.errors import InvalidArgument, NotFound
from meshserve.vocab import ModelKind
from worker.types import ModelSpec

log = logging.getLogger(__name__)

SPEC_FILENAME = "meshserve-model.json"
MODELS_DIR_ENV = "MESHSERVE_MODELS_DIR"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PACKAGE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_KEYS = frozenset({"name", "kind", "backend", "path", "package", "max_concurrency", "options"})


def valid_model_name(name: str) -> bool:
    """Letters, digits, '.', '_', '-'; starts with a letter or digit; never '..'."""
    return bool(_NAME_RE.match(name)) and ".." not in name


def default_models_dir() -> Path:
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "meshserve" / "models"


def _model_dir(models_dir: Path, name: str) -> Path:
    if not valid_model_name(name):
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return Path(models_dir) / name


def load_spec(models_dir: Path, name: str) -> ModelSpec:
    """Read and validate `<models_dir>/<name>/meshserve-model.json`."""
    model_dir = _model_dir(models_dir, name)
    spec_file = model_dir / SPEC_FILENAME
    if not spec_file.is_file():
        raise NotFound(
            f"model {name!r} not found: {spec_file} does not exist. "
            f"Run `meshserve models make-demo` to build the demo models into {models_dir}, "
            f"or create {SPEC_FILENAME} in {model_dir}."
        )
    try:
        raw = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{spec_file}: not a valid JSON file: {e}") from e
    return _parse_spec(raw, model_dir, spec_file)


def _parse_spec(raw: Any, model_dir: Path, spec_file: Path) -> ModelSpec:
    def bad(msg: str) -> InvalidArgument:
        return InvalidArgument(f"{spec_file}: {msg}")

    if not isinstance(raw, dict):
        raise bad("expected a JSON object")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise bad(f"unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    name = raw.get("name", model_dir.name)
    if name != model_dir.name:
        raise bad(f"name {name!r} does not match its directory name {model_dir.name!r}")
    kinds = [k.value for k in ModelKind]
    kind = raw.get("kind")
    if kind not in kinds:
        raise bad(f"kind must be one of {kinds}, got {kind!r}")
    backend = raw.get("backend")
    if not isinstance(backend, str) or not backend:
        raise bad(f'backend must be a non-empty string such as "torch", got {backend!r}')
    max_concurrency = raw.get("max_concurrency", ModelSpec.max_concurrency)
    # bool is an int subclass: reject `true` explicitly.
    if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool):
        raise bad(f"max_concurrency must be an integer, got {max_concurrency!r}")
    if max_concurrency < 0:  # 0: no per-model limit (the engine queues)
        raise bad(f"max_concurrency must be >= 0, got {max_concurrency}")
    options = raw.get("options", {})
    if not isinstance(options, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    ):
        raise bad("options must be an object of string values")

    package = raw.get("package")
    if package is not None and (not isinstance(package, str) or not _PACKAGE_RE.match(package)):
        raise bad(f"package must be a Python package name, got {package!r}")
    rel_path = raw.get("path")
    if rel_path is not None and not isinstance(rel_path, str):
        raise bad(f"path must be a string, got {rel_path!r}")
    if rel_path is not None and package is not None:
        raise bad("set either path or package, not both")
    path: str | None = None
    if package is None:
        root = model_dir.resolve()
        resolved = (root / (rel_path or ".")).resolve()
        if not resolved.is_relative_to(root):
            raise bad(f"path {rel_path!r} leaves the model directory {root}")
        path = str(resolved)
    return ModelSpec(
        name=name,
        kind=ModelKind(kind),
        backend=backend,
        path=path,
        package=package,
        max_concurrency=max_concurrency,
        options=dict(options),
    )


def write_spec(models_dir: Path, spec: ModelSpec) -> Path:
    """Write `spec` as `<models_dir>/<name>/meshserve-model.json` (atomically).

    `spec.path` is stored relative to the model directory and must lie inside it.
    """
    model_dir = _model_dir(models_dir, spec.name)
    model_dir.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind.value,
        "backend": spec.backend,
        "max_concurrency": spec.max_concurrency,
    }
    if spec.path is not None:
        root = model_dir.resolve()
        resolved = (root / spec.path).resolve()
        if not resolved.is_relative_to(root):
            raise InvalidArgument(f"model path {spec.path} is outside {root}")
        raw["path"] = resolved.relative_to(root).as_posix()
    if spec.package is not None:
        raw["package"] = spec.package
    if spec.options:
        raw["options"] = dict(spec.options)
    spec_file = model_dir / SPEC_FILENAME
    # Write then rename so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".spec-", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a spec is not secret
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2)
            f.write("\n")
        os.replace(tmp, spec_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return spec_file


def list_specs(models_dir: Path) -> list[ModelSpec]:
    """All valid specs under `models_dir`, sorted by name.

    A broken spec is logged and skipped so one bad directory does not hide the others;
    `load_spec` on that name reports what is wrong.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    specs: list[ModelSpec] = []
    for entry in sorted(models_dir.iterdir()):
        if not valid_model_name(entry.name) or not (entry / SPEC_FILENAME).is_file():
            continue
        try:
            specs.append(load_spec(models_dir, entry.name))
        except InvalidArgument as e:
            log.warning("skipping model %s: %s", entry.name, e.message)
    return specs
