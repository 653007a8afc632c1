"""The committed stubs under meshserve/v1/ must match what `make protos` generates."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genprotos.py"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "meshserve" / "v1").iterdir())
    assert generated, "protoc generated nothing"
    stale = [
        str(rel) for rel in generated if (tmp_path / rel).read_bytes() != (ROOT / rel).read_bytes()
    ]
    assert not stale, f"stale stubs (run `make protos`): {stale}"


def test_buf_lint_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        pytest.skip("buf is not installed (pip install buf-bin)")
    res = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
