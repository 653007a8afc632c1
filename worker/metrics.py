"""The worker's Prometheus metrics (docs/metrics.md lists each): the edge (calls and
errors), the host (tokens, prefill and decode time per request), the engines (batch
sizes, step and prefill times) through their hooks, plus gauges read from the host on
the event loop when Prometheus scrapes (in flight, queue, KV cache, model states, device
memory)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshserve.edge import Call
from meshserve.errors import MeshError
from meshserve.httpd import on_loop
from meshserve.metrics import (
    GAP_BUCKETS,
    TTFT_BUCKETS,
    CallMetrics,
    LoopMetrics,
    process_registry,
)
from meshserve.vocab import Device, ModelState
from worker.host import ModelHost
from worker.observe import Generation

log = logging.getLogger(__name__)

OTHER = "other"  # the model label of requests for models this worker does not serve
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class WorkerMetrics:
    """EdgeHook, HostObserver and EngineObserver for Prometheus. One per worker."""

    def __init__(self, models: frozenset[str], *, registry: CollectorRegistry | None = None):
        self.registry = registry or process_registry()
        self._models = models
        r = self.registry
        loop = LoopMetrics()  # per-call metrics, updated on the event loop only
        r.register(loop)
        self.calls = CallMetrics(loop, "meshserve_worker", "Call duration at the worker.")
        self.errors = Counter(
            "meshserve_worker_errors",
            "Failed calls by model, gRPC code and reason (ErrorInfo.reason).",
            ["model", "code", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "meshserve_worker_tokens_generated",
            "Tokens generated and sent, by model.",
            ["model"],
            registry=r,
        )
        self.queue = Histogram(
            "meshserve_worker_engine_queue_seconds",
            "Time a request waited inside the engine for a slot.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            "meshserve_worker_prefill_seconds",
            "Per request: admission to the first token, less the engine queue.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.decode = Histogram(
            "meshserve_worker_decode_seconds_per_token",
            "Per request: mean time per token after the first.",
            ["model"],
            buckets=GAP_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "meshserve_worker_batch_size",
            "Requests in each engine decode step (continuous batching).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_time = Histogram(
            "meshserve_worker_engine_step_seconds",
            "Duration of each engine step, launch to tokens on the host.",
            ["model", "phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.prefill_tokens = Counter(
            "meshserve_worker_prefill_tokens",
            "Prompt tokens prefilled, by model.",
            ["model"],
            registry=r,
        )

    def _model(self, name: str) -> str:
        return name if name in self._models else OTHER

    # -- EdgeHook ----------------------------------------------------------------
    def begin(self, call: Call) -> None:
        pass

    def end(self, call: Call, code: str, error: MeshError | None) -> None:
        if call.method == "WatchLoad":
            return  # a long-lived stream of reports, not a request
        model = self._model(call.model)
        self.calls.record(call.method, model, code, time.perf_counter() - call.started)
        if error is not None:
            self.errors.labels(model, code, str(error.reason)).inc()

    # -- HostObserver ------------------------------------------------------------
    def generated(self, g: Generation) -> None:
        model = self._model(g.model)
        if g.tokens:
            self.tokens.labels(model).inc(g.tokens)
        self.queue.labels(model).observe(g.queue_s)
        if g.first_token_s is not None:
            self.prefill_time.labels(model).observe(max(0.0, g.first_token_s - g.queue_s))
            if g.tokens > 1:
                per_token = (g.total_s - g.first_token_s) / (g.tokens - 1)
                self.decode.labels(model).observe(per_token)

    # -- EngineObserver (engine threads; prometheus-client is thread-safe) ----------
    def prefill(self, model: str, requests: int, tokens: int, seconds: float) -> None:
        self.prefill_tokens.labels(self._model(model)).inc(tokens)
        self.step_time.labels(self._model(model), "prefill").observe(seconds)

    def step(self, model: str, batch_size: int, seconds: float) -> None:
        m = self._model(model)
        self.batch.labels(m).observe(batch_size)
        self.step_time.labels(m, "decode").observe(seconds)


@dataclass(frozen=True)
class _ModelGauges:
    name: str
    state: ModelState
    inflight: int
    waiting: int
    kv_cache_use: float
    load_s: float
    max_concurrency: int


MemoryReader = Callable[[Device], tuple[int, int] | None]


def device_memory(device: Device) -> tuple[int, int] | None:
    """(used, total) bytes of the worker's accelerator: NVML when nvidia-ml-py is
    installed (what the whole device holds, all processes), else torch's own view of
    its allocations; None on CPU."""
    if device.kind != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device.index))
        return int(info.used), int(info.total)
    except Exception:  # no NVML library, no driver access: fall back to torch
        pass
    import torch

    return int(torch.cuda.memory_allocated(device.index)), int(device.memory_bytes)


class HostCollector(Collector):
    """Gauges of the host, read on the event loop (the host's state belongs to it)."""

    def __init__(
        self,
        host: ModelHost,
        loop: asyncio.AbstractEventLoop,
        *,
        memory: MemoryReader = device_memory,
    ) -> None:
        self._host = host
        self._loop = loop
        self._memory = memory

    async def _snapshot(self) -> list[_ModelGauges]:
        out = []
        for st in self._host.statuses():
            backend = self._host.backend(st.spec.name)
            report = backend.load_report() if backend is not None else None
            out.append(
                _ModelGauges(
                    st.spec.name,
                    st.state,
                    self._host.model_inflight(st.spec.name),
                    report.waiting if report else 0,
                    report.kv_cache_use if report else 0.0,
                    st.load_s,
                    st.max_concurrency,
                )
            )
        return out

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            models: list[_ModelGauges] = on_loop(self._loop, self._snapshot)
        except Exception:  # the loop is gone or busy: skip these gauges this scrape
            log.debug("worker gauges unavailable this scrape", exc_info=True)
            return
        families = {
            "inflight": GaugeMetricFamily(
                "meshserve_worker_inflight", "Requests admitted, by model.", labels=["model"]
            ),
            "waiting": GaugeMetricFamily(
                "meshserve_worker_queue_depth",
                "Requests waiting inside the engine for a slot.",
                labels=["model"],
            ),
            "kv": GaugeMetricFamily(
                "meshserve_worker_kv_cache_usage_ratio",
                "Fraction of the model's KV cache in use.",
                labels=["model"],
            ),
            "load": GaugeMetricFamily(
                "meshserve_worker_model_load_seconds",
                "How long loading the model took.",
                labels=["model"],
            ),
            "slots": GaugeMetricFamily(
                "meshserve_worker_model_max_concurrency",
                "Requests the model runs at once at full speed.",
                labels=["model"],
            ),
        }
        state = GaugeMetricFamily(
            "meshserve_worker_model_state",
            "1 for the state each model is in, 0 for the others.",
            labels=["model", "state"],
        )
        for m in models:
            families["inflight"].add_metric([m.name], m.inflight)
            families["waiting"].add_metric([m.name], m.waiting)
            families["kv"].add_metric([m.name], m.kv_cache_use)
            families["load"].add_metric([m.name], m.load_s)
            families["slots"].add_metric([m.name], m.max_concurrency)
            for s in ModelState:
                state.add_metric([m.name, s.value], 1.0 if s is m.state else 0.0)
        yield from families.values()
        yield state
        yield from self._device_memory()

    def _device_memory(self) -> Iterator[GaugeMetricFamily]:
        device = self._host.device
        reading = self._memory(device)
        if reading is None:
            return
        used, total = reading
        for name, doc, value in (
            ("used", "Accelerator memory in use.", used),
            ("total", "Accelerator memory in all.", total),
        ):
            family = GaugeMetricFamily(
                f"meshserve_worker_device_memory_{name}_bytes", doc, labels=["device"]
            )
            family.add_metric([device.label], value)
            yield family
