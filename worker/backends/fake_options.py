"""The FakeBackend's options (strings in `ModelSpec.options`), parsed and checked."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from meshserve.errors import InvalidArgument
from meshserve.vocab import ModelKind
from worker.types import ModelSpec

DISTRIBUTIONS = ("fixed", "exponential", "lognormal")


@dataclass(frozen=True)
class FakeOptions:
    per_request_ms: float = 5.0  # mean time to first token / of an Infer call
    per_token_ms: float = 2.0  # time per generated token after the first
    distribution: str = "fixed"  # of the per-request time: fixed | exponential | lognormal
    sigma: float = 1.0  # lognormal sigma (the mean stays per_request_ms)
    slots: int = 4  # requests served at once; more wait FIFO
    speed: float = 1.0  # divides every time
    error_rate: float = 0.0  # probability of Internal("injected failure") before token 1
    hang_rate: float = 0.0  # probability a request hangs until cancelled
    seed: int | None = None  # of the backend's RNG; None = random
    max_queue: int = 1024  # waiting requests beyond which new ones get ResourceExhausted


def _number(name: str, raw: str, *, integer: bool = False) -> float:
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise InvalidArgument(f"fake backend option {name}={raw!r}: must be {kind}") from None
    if not math.isfinite(value):
        raise InvalidArgument(f"fake backend option {name}={raw!r}: must be finite")
    return value


def _check(ok: bool, name: str, raw: str, rule: str) -> None:
    if not ok:
        raise InvalidArgument(f"fake backend option {name}={raw!r}: must be {rule}")


def parse_fake_options(options: Mapping[str, str]) -> FakeOptions:
    """Parse and validate `ModelSpec.options`; InvalidArgument names the bad option."""
    known = {f.name for f in fields(FakeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgument(f"unknown fake backend option(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, raw in options.items():
        if name == "distribution":
            _check(raw in DISTRIBUTIONS, name, raw, f"one of {list(DISTRIBUTIONS)}")
            values[name] = raw
        elif name in ("slots", "max_queue", "seed"):
            value = int(_number(name, raw, integer=True))
            low = 1 if name == "slots" else 0
            _check(name == "seed" or value >= low, name, raw, f">= {low}")
            values[name] = value
        else:
            x = _number(name, raw)
            if name in ("error_rate", "hang_rate"):
                _check(0.0 <= x <= 1.0, name, raw, "a probability in [0, 1]")
            elif name == "speed":
                _check(x > 0, name, raw, "> 0")
            else:  # per_request_ms, per_token_ms, sigma
                _check(x >= 0, name, raw, ">= 0")
            values[name] = x
    return FakeOptions(**values)


def fake_spec(name: str, kind: ModelKind = ModelKind.GENERATE, **options: str) -> ModelSpec:
    """A FakeBackend model; the backend queues, so the host sets no per-model limit (0)."""
    parse_fake_options(options)  # fail here, not when a worker loads it
    return ModelSpec(name, kind, backend="fake", max_concurrency=0, options=dict(options))
