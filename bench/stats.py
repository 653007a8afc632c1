"""Statistics of benchmark samples, on numpy: percentiles, medians, summaries.

Empty input gives NaN, never an exception: a phase that measured nothing shows up as a
missing figure in the results, not as a crash after minutes of measuring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Samples = npt.ArrayLike


def _array(values: Samples) -> npt.NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64).ravel()


def percentile(values: Samples, q: float, *, nearest: bool = False) -> float:
    """The q-th percentile (q in 0..100). Default: linear interpolation between the two
    nearest samples (numpy's default); `nearest`: the nearest rank, always an observed
    value (a miss recorded as +inf stays +inf instead of turning into NaN)."""
    return percentiles(values, (q,), nearest=nearest)[0]


def percentiles(values: Samples, qs: Sequence[float], *, nearest: bool = False) -> list[float]:
    a = _array(values)
    if a.size == 0:
        return [math.nan] * len(qs)
    method: Literal["inverted_cdf", "linear"] = "inverted_cdf" if nearest else "linear"
    return [float(x) for x in np.percentile(a, list(qs), method=method)]


def weighted_percentile(values: Samples, weights: Samples, q: float) -> float:
    """Percentile where each value counts `weights` times (integer weights)."""
    v = _array(values)
    if v.size == 0:
        return math.nan
    w = np.asarray(weights, dtype=np.int64).ravel()
    return float(np.percentile(np.repeat(v, w), q))


def median(values: Iterable[float | None]) -> float:
    """Median of the present values: None and NaN (nothing measured) are left out."""
    a = _array([math.nan if v is None else v for v in values])
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else math.nan


def median_at(rows: Iterable[Any], *path: str) -> float:
    """Median over `rows` of row[path[0]][path[1]]...: one figure across trials."""
    values = []
    for row in rows:
        v = row
        for key in path:
            v = v[key]
        values.append(float(v))
    return median(values)


def summarize(
    values: Samples,
    qs: Sequence[float] = (50, 99),
    *,
    nearest: bool = False,
    suffix: str = "",
    digits: int | None = None,
) -> dict[str, float]:
    """{"n", "p50<suffix>", ..., "max<suffix>"}, rounded to `digits` when given."""
    a = _array(values)
    figures = [*percentiles(a, qs, nearest=nearest), float(a.max()) if a.size else math.nan]
    names = [f"p{q:g}{suffix}" for q in qs] + [f"max{suffix}"]
    out: dict[str, float] = {"n": int(a.size)}
    for name, x in zip(names, figures, strict=True):
        out[name] = x if digits is None else round(x, digits)
    return out
