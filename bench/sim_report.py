"""Tables (markdown), target checks and the plot for bench.sim's summary rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
DEFAULT = "latency_capacity"
MAIN = ("round_robin", "weighted_round_robin", "random", "least_inflight")
BY_REPORTS = ("least_loaded_naive", "p2c", DEFAULT, f"{DEFAULT}@4gw")
SHORT = {
    "round_robin": "rr",
    "weighted_round_robin": "wrr",
    "random": "random",
    "least_inflight": "least_inflight",
    "least_loaded_naive": "naive",
    "p2c": "p2c",
    DEFAULT: "lat_cap",
    f"{DEFAULT}@4gw": "lat_cap 4gw",
    "least_inflight@4gw": "least_inflight 4gw",
}


def _cells(rows: Iterable[Row]) -> list[tuple[Any, ...]]:
    seen = {(r["slots"], r["fleet"], r["sizes"], r["load"]) for r in rows}
    return sorted(seen)


def _index(rows: Iterable[Row]) -> dict[tuple[Any, ...], Row]:
    return {
        (r["slots"], r["fleet"], r["sizes"], r["load"], r["reports"], r["arm"]): r for r in rows
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _cell_label(cell: tuple[Any, ...]) -> list[str]:
    slots, fleet, sizes, load = cell
    return [str(slots), fleet, sizes, f"{load:.1f}"]


def ratio_table(rows: list[Row], stat: str, arms_main: Iterable[str] = MAIN) -> str:
    """One row per cell: `stat` of each arm; report-dependent arms as fresh / stale."""
    ix = _index(rows)
    main = [a for a in arms_main if any(r["arm"] == a for r in rows)]
    split = [a for a in BY_REPORTS if any(r["arm"] == a for r in rows)]
    header = ["slots", "fleet", "sizes", "load", "oracle p99 (s)"]
    header += [SHORT.get(a, a) for a in main] + [f"{SHORT.get(a, a)} fresh / stale" for a in split]
    body = []
    for cell in _cells(rows):
        oracle = ix.get((*cell, "fresh", "oracle"))
        line = [*_cell_label(cell), _fmt(oracle["p99"] if oracle else None)]
        line += [_fmt(ix[(*cell, "fresh", a)][stat]) for a in main]
        for a in split:
            fresh, stale = ix.get((*cell, "fresh", a)), ix.get((*cell, "stale", a))
            f_val = fresh[stat] if fresh else None
            s_val = stale[stat] if stale else None
            line.append(f"{_fmt(f_val)} / {_fmt(s_val)}")
        body.append(line)
    return _table(header, body)


def _check(
    name: str,
    limit: float,
    rows: Iterable[Row],
    value: Callable[[Row], float | None],
    note: Callable[[Row], str] = lambda r: "",
) -> dict[str, Any]:
    worst, failed, n = 0.0, [], 0
    for r in rows:
        v = value(r)
        if v is None:
            continue
        n += 1
        worst = max(worst, v)
        if v > limit:
            label = f"{r['slots']} slot {r['fleet']} {r['sizes']} load {r['load']} {r['reports']}"
            failed.append(f"{label}: {v:.2f}{note(r)}")
    return {
        "target": name,
        "limit": limit,
        "cells": n,
        "worst": round(worst, 3),
        "met": not failed and n > 0,
        "failed": failed,
    }


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    one = [r for r in rows if r["arm"] == DEFAULT]
    four = [r for r in rows if r["arm"] == f"{DEFAULT}@4gw"]
    hetero = [
        r
        for r in one
        if r["load"] == 0.9 and r["sizes"].startswith("lognormal") and r["fleet"] != "homogeneous"
    ]
    naive = [r for r in rows if r["arm"] == "least_loaded_naive"]
    ix = _index(rows)

    def oracle_vs_wrr(r: Row) -> str:
        o = ix.get((r["slots"], r["fleet"], r["sizes"], r["load"], "fresh", "oracle"))
        return f" (oracle itself {o['p99_vs_wrr']:.2f})" if o else ""

    return [
        _check(
            "p99 / oracle, 4 slots",
            1.3,
            (r for r in one if r["slots"] == 4),
            lambda r: r["p99_vs_oracle"],
        ),
        _check(
            "p99 / oracle, 1 slot",
            1.9,
            (r for r in one if r["slots"] == 1),
            lambda r: r["p99_vs_oracle"],
        ),
        _check(
            "p99 / weighted RR, load 0.9, lognormal, heterogeneous",
            0.5,
            hetero,
            lambda r: r["p99_vs_wrr"],
            oracle_vs_wrr,
        ),
        _check("stale / fresh p99, one gateway", 1.3, one, lambda r: r["p99_vs_fresh"]),
        _check("stale / fresh p99, four gateways", 1.3, four, lambda r: r["p99_vs_fresh"]),
        _check(
            "stale / fresh p99, least_loaded_naive (should fail)",
            1.3,
            naive,
            lambda r: r["p99_vs_fresh"],
        ),
        _check("four gateways / one gateway p99", 1.4, four, lambda r: r["p99_vs_1gw"]),
    ]


def _spread(rows: list[Row], arm: str, key: str) -> tuple[float | None, float | None]:
    vals = sorted(r[key] for r in rows if r["arm"] == arm and r[key] is not None)
    return (vals[len(vals) // 2], vals[-1]) if vals else (None, None)


def summary_table(rows: list[Row]) -> str:
    """Per arm, over every cell: median and worst of each ratio."""
    arms = sorted({r["arm"] for r in rows}, key=lambda a: (a.count("/"), "@" in a, a))
    keys = ("p99_vs_oracle", "p50_vs_oracle", "p99_vs_wrr", "p99_vs_fresh", "p99_vs_1gw")
    body = []
    for arm in arms:
        line = [arm]
        for key in keys:
            med, worst = _spread(rows, arm, key)
            line.append(f"{_fmt(med)} / {_fmt(worst)}")
        body.append(line)
    header = [
        "arm (median / worst over cells)",
        "p99 / oracle",
        "p50 / oracle",
        "p99 / wrr",
        "p99 stale / fresh",
        "p99 4gw / 1gw",
    ]
    return _table(header, body)


def render(rows: list[Row], *, command: str, seeds: int, n_jobs: int, wall: float) -> str:
    ablation = [r for r in rows if "/" in r["arm"]]
    parts = [
        f"`{command}`: {seeds} seed(s) x {n_jobs} jobs per cell, {wall:.0f} s wall",
        "### p99 / oracle p99 (one gateway unless marked 4gw)",
        ratio_table(rows, "p99_vs_oracle"),
        "### p99 / weighted round robin p99",
        ratio_table(rows, "p99_vs_wrr"),
        "### Summary over cells",
        summary_table(rows),
        "### Targets (default policy)",
        _table(
            ["target", "limit", "worst", "met", "cells over the limit"],
            [
                [
                    t["target"],
                    _fmt(t["limit"]),
                    _fmt(t["worst"]),
                    "yes" if t["met"] else "NO",
                    "; ".join(t["failed"]) or "-",
                ]
                for t in targets(rows)
            ],
        ),
    ]
    if ablation:
        arms = [DEFAULT, f"{DEFAULT}@4gw", *sorted({r["arm"] for r in ablation})]
        sub = [r for r in rows if r["arm"] in arms or r["arm"] == "oracle"]
        keep = {(r["slots"], r["fleet"], r["sizes"], r["load"]) for r in ablation}
        sub = [r for r in sub if (r["slots"], r["fleet"], r["sizes"], r["load"]) in keep]
        parts += ["### Ablations: p99 / oracle p99", ratio_table(sub, "p99_vs_oracle", arms)]
    return "\n\n".join(parts)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(a, "fresh") for a in (*MAIN, "p2c", DEFAULT)]
    series += [("least_loaded_naive", "stale"), (DEFAULT, "stale"), (f"{DEFAULT}@4gw", "stale")]
    ix = _index(rows)
    slots_all = sorted({r["slots"] for r in rows})
    fig, axes = plt.subplots(len(slots_all), 1, figsize=(13, 4.2 * len(slots_all)), squeeze=False)
    for ax, slots in zip(axes[:, 0], slots_all, strict=True):
        cells = [c for c in _cells(rows) if c[0] == slots]
        xs = range(len(cells))
        for arm, reports in series:
            ys = [ix.get((*c, reports, arm), {}).get("p99_vs_oracle") for c in cells]
            bold = arm.startswith(DEFAULT)
            ax.plot(
                xs,
                [y if y is not None else float("nan") for y in ys],
                marker="o" if bold else ".",
                lw=2.0 if bold else 0.8,
                ls="-" if reports == "fresh" else "--",
                label=f"{SHORT.get(arm, arm)} ({reports})",
            )
        ax.axhline(1.3 if slots > 1 else 1.9, color="k", lw=0.8, ls=":", label="target")
        ax.set_yscale("log")
        ax.set_ylabel("p99 / oracle p99")
        ax.set_title(f"{slots} slot(s) per worker, 8 workers")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{c[1]}\n{c[2]} {c[3]}" for c in cells], rotation=90, fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
