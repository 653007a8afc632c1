"""The GPU check's table and targets (from the result dict; partial results welcome)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.report import Target, targets_table

ROWS = (
    ("static generate", "references", "static generate"),
    ("bare compiled loop", "references", "bare compiled loop"),
    ("torch backend direct", "mesh", "direct"),
    ("torch backend via gateway", "mesh", "gateway"),
)
STEP_LIMIT = 1.25  # gateway @32 ms/step <= 1.25x the bare loop's batch-32 step
TPS_LIMIT = 0.8  # 32 streams >= 0.8x the bare loop's offline batch-32 tokens/s


def _cell(result: dict[str, Any], section: str, key: str, n: int) -> dict[str, Any] | None:
    found = result.get(section, {}).get(key, {}).get(str(n))
    return found if isinstance(found, dict) else None


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def checks(result: dict[str, Any], n: int = 32) -> list[Target]:
    bare = _cell(result, "references", "bare compiled loop", n) or {}
    bare_step, bare_tps = _num(bare.get("ms_per_step")), _num(bare.get("tokens_per_s"))
    out: list[Target] = []
    for arm, label in (("gateway", "target"), ("direct", "info")):
        m = _cell(result, "mesh", arm, n) or {}
        step, tps = _num(m.get("ms_per_step")), _num(m.get("tokens_per_s"))
        out.append(Target(
            f"{arm} @{n} ms/step / bare loop batch-{n} ms/step", step / bare_step, STEP_LIMIT,
            "x", False, note=f"{label}: {_fmt(step, 3)} vs {_fmt(bare_step, 3)} ms",
        ))  # fmt: skip
        out.append(Target(
            f"{arm} @{n} tok/s / bare loop offline batch-{n} tok/s", tps / bare_tps, TPS_LIMIT,
            "x", True, note=f"{label}: {_fmt(tps, 0)} vs {_fmt(bare_tps, 0)} tok/s",
        ))  # fmt: skip
    return out


def table(result: dict[str, Any], counts: Sequence[int]) -> str:
    cfg = result.get("config", {})
    mach = result.get("machine", {})
    model = result.get("model", {})
    lines = [
        f"GPU check on {mach.get('device_name', '?')} (torch {mach.get('torch', '?')}, "
        f"transformers {mach.get('transformers', '?')}, Python {mach.get('python', '?')})",
        f"model {model.get('name', '?')}: {_num(model.get('params')) / 1e6:.1f}M params, "
        f"{model.get('dtype', '?')}, options {model.get('options', {})}, max_concurrency "
        f"{model.get('max_concurrency', '?')}; prompt {cfg.get('prompt_len')} tokens, "
        f"max_tokens {cfg.get('max_tokens')}, greedy, ignore_eos",
        "ms/step: decode step (median over streams of (last - first token) / (tokens - 1)); "
        "tok/s: all tokens / round time; TTFT p50 in ms. References at batch = streams.",
        "",
    ]
    head = f"{'':<28}" + "".join(f"| {f'{n} stream' + ('s' if n > 1 else ''):^27}" for n in counts)
    sub = f"{'':<28}" + "".join(f"| {'ms/step':>8} {'tok/s':>9} {'TTFT':>8}" for _ in counts)
    lines += [head, sub, "-" * len(sub)]
    for label, section, key in ROWS:
        if section == "references":  # say what actually ran
            cells_in = result.get(section, {}).get(key, {}).values()
            compiled = any(bool(c.get("compiled")) for c in cells_in if isinstance(c, dict))
            label = label.replace("compiled ", "") + (" (compiled)" if compiled else " (eager)")
        cells = []
        for n in counts:
            c = _cell(result, section, key, n) or {}
            step = _fmt(_num(c.get("ms_per_step")), 3)
            tps = _fmt(_num(c.get("tokens_per_s")), 0)
            ttft = _fmt(_num(c.get("ttft_p50_ms")), 2)
            cells.append(f"| {step:>8} {tps:>9} {ttft:>8}")
        lines.append(f"{label:<28}" + "".join(cells))
    lines += ["", "targets (issue 4; the bare loop is measured in the same run):"]
    lines.append(targets_table(checks(result, max(counts))))
    if result.get("errors"):
        lines += ["", "errors:"] + [f"  {e}" for e in result["errors"]]
    if result.get("skipped"):
        lines += ["", "skipped:"] + [f"  {s}" for s in result["skipped"]]
    if not result.get("complete"):
        lines += ["", f"PARTIAL RESULTS: {result.get('stopped_by', 'stopped early')}"]
    return "\n".join(lines)
