"""The benchmarks' shared results harness: targets, their table, the results JSON.

Every benchmark that writes results writes them through `write_results`: strict JSON
(a miss recorded as inf, or an empty statistic's NaN, becomes null) with what the
numbers were measured on under "machine".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Target:
    """One figure checked against its limit."""

    name: str
    value: float
    limit: float
    unit: str
    higher_is_better: bool
    per_run: tuple[float, ...] = ()  # each run's figure, where `value` aggregates runs
    aggregate: str = ""  # how: "median" or "max" (correctness: every run must pass)
    key: str = ""  # a stable id in the results
    note: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    @property
    def verdict(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        return "PASS" if self.passed else "MISS"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "pass": self.passed,
            "result": self.verdict,
        }
        if self.key:
            out["key"] = self.key
        if self.per_run:
            out |= {"per_run": list(self.per_run), "aggregate": self.aggregate}
        if self.note:
            out["note"] = self.note
        return out


def fmt(x: float) -> str:
    """Two to four significant digits; inf (something never happened) is "miss"."""
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "miss"
    if abs(x) >= 100 or x == int(x):
        return f"{x:.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def targets_table(targets: Sequence[Target]) -> str:
    runs = any(t.per_run for t in targets)
    rows = [["target", *(["per run"] if runs else []), "value", "limit", "result", ""]]
    for t in targets:
        how = f"{t.aggregate} " if len(t.per_run) > 1 and t.aggregate else ""
        op = ">=" if t.higher_is_better else "<="
        rows.append([
            t.name,
            *([" ".join(fmt(x) for x in t.per_run)] if runs else []),
            f"{how}{fmt(t.value)} {t.unit}".strip(),
            f"{op} {fmt(t.limit)} {t.unit}".strip(),
            t.verdict,
            t.note,
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]  # fmt: skip
    lines.insert(1, "  " + "-" * (len(lines[0]) - 2))
    return "\n".join(lines)


def machine(loadavg_at_start: Sequence[float] | None = None) -> dict[str, Any]:
    """What the numbers were measured on, with the load average around the run (the
    machine is shared: other work running meanwhile shows up here)."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    out: dict[str, Any] = {
        "cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "loadavg_at_start": tuple(loadavg_at_start) if loadavg_at_start is not None else None,
        "loadavg_at_end": os.getloadavg(),
    }
    grpc = sys.modules.get("grpc")
    if grpc is not None:
        out["grpcio"] = grpc.__version__
    return out


def json_safe(x: Any) -> Any:
    """Strict JSON: a miss (inf) or an empty statistic (nan) becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def write_results(path: Path, doc: dict[str, Any], *, indent: int = 2) -> Path:
    """The results JSON, with "machine" added where the benchmark did not set it."""
    doc.setdefault("machine", machine())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(doc), indent=indent, default=str) + "\n")
    return path


def finish(result: dict[str, Any], targets: Sequence[Target], path: Path) -> None:
    """Print the machine's load and the targets, write the results with the targets."""
    result["targets"] = [t.as_dict() for t in targets]
    load = result.setdefault("machine", machine())
    print(
        f"  load average (1/5/15 min) at start {load['loadavg_at_start']}, at end "
        f"{load['loadavg_at_end']} on {len(load['cpus'])} shared CPUs"
    )
    print(targets_table(targets))
    print(f"wrote {write_results(path, result)}")


def results_path(out: Path | None, name: str) -> Path:
    """`out` if given, else bench/results/<name>.json."""
    return out or RESULTS_DIR / f"{name}.json"
