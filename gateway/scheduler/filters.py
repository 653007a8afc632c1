"""Filters: drop candidates that should not get the request.

A filter never turns a non-empty list into an empty one: when every candidate would be
dropped it returns its input unchanged, because a degraded worker beats no worker (the
Router's ejection and retries handle workers that really are down). Filters are predicates
underneath, so sampling policies can test a sampled candidate alone and sample again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gateway.scheduler.types import Candidate, RequestFacts

DEFAULT_MAX_ERROR_RATE = 0.25
DEFAULT_MAX_KV_USE = 0.98


@dataclass(frozen=True, slots=True)
class Filter:
    name: str
    keep: Callable[[RequestFacts, Candidate], bool]

    def __call__(
        self, request: RequestFacts, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        """The candidates `keep` accepts, or all of them when it accepts none."""
        kept = [c for c in candidates if self.keep(request, c)]
        return kept if kept else candidates


def make_healthy(max_error_rate: float = DEFAULT_MAX_ERROR_RATE) -> Filter:
    """Drop workers whose recent error rate is above `max_error_rate`.

    A failing worker answers fast and so looks idle: unfiltered, it attracts traffic.
    """
    return Filter("healthy", lambda _r, c: c.error_rate <= max_error_rate)


def make_kv_headroom(max_kv_use: float = DEFAULT_MAX_KV_USE) -> Filter:
    """Drop workers whose KV cache is at least `max_kv_use` full.

    A full cache means preemption or rejection, which its queue length does not show.
    """
    return Filter("kv_headroom", lambda _r, c: c.kv_cache_use < max_kv_use)


healthy = make_healthy()
kv_headroom = make_kv_headroom()

FILTERS: Mapping[str, Filter] = {f.name: f for f in (healthy, kv_headroom)}
DEFAULT_FILTERS: tuple[Filter, ...] = (healthy, kv_headroom)


def passes(filters: Sequence[Filter], request: RequestFacts, c: Candidate) -> bool:
    """Whether `c` alone survives every filter."""
    return all(f.keep(request, c) for f in filters)


def apply_filters(
    filters: Sequence[Filter], request: RequestFacts, candidates: Sequence[Candidate]
) -> Sequence[Candidate]:
    """Each filter in turn; never empties a non-empty input."""
    for f in filters:
        keep = f.keep  # Filter.__call__ inlined: this runs on every routing decision
        kept = [c for c in candidates if keep(request, c)]
        if kept:
            candidates = kept
    return candidates
