"""What the gateway's and the worker's Prometheus metrics share: a registry per process
with the standard process collectors, and histogram buckets chosen for this workload."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Whole calls: embeddings take milliseconds, long generations minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time to first token: a prefill (ms) to a long queue (s).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Between tokens: a decode step on a GPU (sub-ms) to a busy CPU (100s of ms).
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


def process_registry() -> CollectorRegistry:
    """A registry of one gateway or worker, with the process, platform and GC metrics.

    Not prometheus_client's global REGISTRY: tests run gateways and workers in one
    process, each with its own metrics."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


# -- metrics updated by one thread (the event loop) -------------------------------------
#
# prometheus-client takes a lock per update (a histogram observation: three, plus a
# linear scan of its buckets): ~30k instructions per gateway call for the five updates
# a call makes (bench/hop_instructions.py). The gateway's request-path metrics are all
# updated on its event loop, so they are plain numbers here, read by a collector at
# scrape time (a dict copy or a list copy is atomic under the GIL).


class Cell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Hist:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family:
    """A metric family: its name, help and label names."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)


class LoopCounter(_Family):
    """A counter (or, with `gauge=True`, a gauge) updated by one thread only."""

    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str] = (), *, gauge: bool = False
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.gauge = gauge
        self._cells: dict[tuple[str, ...], Cell] = {}

    def labels(self, *values: str) -> Cell:
        cell = self._cells.get(values)
        if cell is None:
            cell = self._cells[values] = Cell()
        return cell

    def remove(self, *values: str) -> None:
        self._cells.pop(values, None)

    def family(self) -> Metric:
        cls = GaugeMetricFamily if self.gauge else CounterMetricFamily
        fam = cls(self.name, self.doc, labels=list(self.labelnames))
        for values, cell in list(self._cells.items()):
            fam.add_metric(list(values), cell.value)
        return fam


class LoopHistogram(_Family):
    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._hists: dict[tuple[str, ...], Hist] = {}

    def labels(self, *values: str) -> Hist:
        hist = self._hists.get(values)
        if hist is None:
            hist = self._hists[values] = Hist(self.bounds)
        return hist

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.labelnames))
        for values, hist in list(self._hists.items()):
            counts, total = list(hist.counts), hist.sum
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            fam.add_metric(list(values), buckets, total)
        return fam


_F = TypeVar("_F", LoopCounter, LoopHistogram)


class LoopMetrics(Collector):
    """The loop-updated families of one process, as one collector."""

    def __init__(self) -> None:
        self._families: list[LoopCounter | LoopHistogram] = []

    def counter(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> LoopCounter:
        return self._add(LoopCounter(name, doc, labelnames))

    def gauge(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> LoopCounter:
        return self._add(LoopCounter(name, doc, labelnames, gauge=True))

    def histogram(
        self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> LoopHistogram:
        return self._add(LoopHistogram(name, doc, labelnames, buckets))

    def _add(self, family: _F) -> _F:
        self._families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for fam in self._families:
            yield fam.family()


class CallMetrics:
    """`<prefix>_requests_total{method,model,code}` and
    `<prefix>_request_duration_seconds{method,model}`: what the gateway's and the
    worker's edges record for every call, one dict lookup per call."""

    def __init__(self, loop_metrics: LoopMetrics, prefix: str, doc: str) -> None:
        self.requests = loop_metrics.counter(
            f"{prefix}_requests",
            "Calls finished, by method, model and gRPC status code.",
            ["method", "model", "code"],
        )
        self.duration = loop_metrics.histogram(
            f"{prefix}_request_duration_seconds", doc, ["method", "model"], DURATION_BUCKETS
        )
        self._children: dict[tuple[str, str, str], tuple[Cell, Hist]] = {}

    def record(self, method: str, model: str, code: str, seconds: float) -> None:
        key = (method, model, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key),
                self.duration.labels(method, model),
            )
        children[0].inc()
        children[1].observe(seconds)
