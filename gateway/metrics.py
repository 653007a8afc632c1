"""The gateway's Prometheus metrics (docs/metrics.md lists each): recorded at the seams
(the edge, the router's dispatch loop, admission) through their hooks, plus gauges read
from the registry view and the admission queue when Prometheus scrapes.

Label values are bounded: a model label is a model some worker lists (anything else is
"other": clients choose the names they send), a worker label a worker in the view.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.admission import AdmissionQueue
from gateway.observe import NO_ATTEMPT, AttemptHook
from gateway.routing import FleetView
from gateway.scheduler.types import RequestFacts
from gateway.transport import Metadata
from meshserve.edge import Call
from meshserve.errors import MeshError
from meshserve.load import CallCost
from meshserve.metrics import (
    GAP_BUCKETS,
    TTFT_BUCKETS,
    CallMetrics,
    Cell,
    Hist,
    LoopMetrics,
    process_registry,
)
from meshserve.vocab import ModelState, WorkerState


class ObservedView(FleetView, Protocol):
    """The registry view as the metrics read it (registry.view.RegistryView)."""

    @property
    def connected(self) -> bool: ...

    def staleness_s(self) -> float | None: ...


OTHER = "other"  # the model label of requests for models no worker lists
DECISION_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    """EdgeHook and RouterObserver for Prometheus. One per gateway (own registry)."""

    def __init__(
        self,
        view: ObservedView,
        admission: AdmissionQueue,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or process_registry()
        self._view = view
        r = LoopMetrics()  # updated on the event loop only: no locks (meshserve.metrics)
        self.registry.register(r)
        self.calls = CallMetrics(
            r,
            "meshserve_gateway",
            "Call duration at the gateway, from arrival to the last response message.",
        )
        self.ttft = r.histogram(
            "meshserve_gateway_time_to_first_token_seconds",
            "Generate: arrival to the first response message (queueing included).",
            ["model"],
            TTFT_BUCKETS,
        )
        self.gap = r.histogram(
            "meshserve_gateway_inter_token_seconds",
            "Generate: mean time between tokens of one stream after the first.",
            ["model"],
            GAP_BUCKETS,
        )
        self.tokens = r.counter(
            "meshserve_gateway_tokens_streamed",
            "Generated tokens relayed to clients (from the workers' own count).",
            ["model"],
        )
        self.open_streams = r.gauge(
            "meshserve_gateway_open_streams", "Generate streams open now."
        ).labels()
        self.queue_wait = r.histogram(
            "meshserve_gateway_queue_wait_seconds",
            "Time calls waited for a worker with room, by priority.",
            ["priority"],
            QUEUE_BUCKETS,
        )
        self.rejections = r.counter(
            "meshserve_gateway_admission_rejections",
            "Calls refused with RESOURCE_EXHAUSTED by the admission queue, by reason.",
            ["reason"],
        )
        self.retries = r.counter(
            "meshserve_gateway_retries",
            "Attempts that failed before the first response and were retried elsewhere.",
            ["model", "reason"],
        )
        self.retries_refused = r.counter(
            "meshserve_gateway_retries_refused",
            "Retryable failures not retried because the retry budget was spent.",
            ["model"],
        )
        self.ejections = r.counter(
            "meshserve_gateway_worker_ejections",
            "Times a worker was routed around (one UNAVAILABLE, or timeouts in a row).",
            ["reason"],
        )
        self.migrations = r.counter(
            "meshserve_gateway_stream_migrations",
            "Streams that broke after their first message, by outcome: resumed on another "
            "worker, failed to, or not tried (limit: max_migrations reached).",
            ["model", "outcome"],
        )
        self.picks = r.counter(
            "meshserve_gateway_worker_picks",
            "Attempts sent to each worker (its traffic share).",
            ["worker"],
        )
        self.decision = r.histogram(
            "meshserve_gateway_routing_decision_seconds",
            "Time the routing policy took to rank the candidates of one attempt.",
            [],
            DECISION_BUCKETS,
        ).labels()
        self.registry.register(_ScrapeTime(view, admission))
        # Children by label values, found with one dict lookup per call.
        self._models: frozenset[str] = frozenset()
        self._picks: dict[str, Cell] = {}
        self._model_children: dict[str, tuple[Hist, Hist, Cell]] = {}
        view.add_listener(self._on_view_change)

    def _on_view_change(self) -> None:
        self._models = frozenset(self._view.models())
        live = self._view.workers
        for wid in [w for w in self._picks if w not in live]:
            del self._picks[wid]
            self.picks.remove(wid)  # a departed worker's series goes with it

    def _model(self, name: str) -> str:
        return name if name in self._models else OTHER

    def _per_model(self, model: str) -> tuple[Hist, Hist, Cell]:
        children = self._model_children.get(model)
        if children is None:
            children = self._model_children[model] = (
                self.ttft.labels(model),
                self.gap.labels(model),
                self.tokens.labels(model),
            )
        return children

    # -- EdgeHook --------------------------------------------------------------
    def begin(self, call: Call) -> None:
        if call.method == "Generate":
            self.open_streams.inc()

    def end(self, call: Call, code: str, error: MeshError | None) -> None:
        model = self._model(call.model)
        self.calls.record(call.method, model, code, time.perf_counter() - call.started)
        if call.method == "Generate":
            self.open_streams.dec()
            if call.first_at:
                self._per_model(model)[0].observe(call.first_at - call.started)

    # -- RouterObserver --------------------------------------------------------
    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        child = self._picks.get(worker_id)
        if child is None:
            child = self._picks[worker_id] = self.picks.labels(worker_id)
        child.inc()
        self.decision.observe(decision_s)

    def attempt(
        self, facts: RequestFacts, worker_id: str, metadata: Metadata
    ) -> tuple[AttemptHook, Metadata]:
        return NO_ATTEMPT, metadata

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        self.retries.labels(self._model(facts.model), str(error.reason)).inc()

    def retry_refused(self, facts: RequestFacts, error: MeshError) -> None:
        self.retries_refused.labels(self._model(facts.model)).inc()

    def ejected(self, worker_id: str, error: MeshError) -> None:
        # By the error's code, not the worker: ids are unbounded, the log names it.
        self.ejections.labels(error.code.value).inc()

    def migrated(self, facts: RequestFacts, worker_id: str, error: MeshError, outcome: str) -> None:
        self.migrations.labels(self._model(facts.model), outcome).inc()

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        priority = {1: "high", 3: "low"}.get(facts.priority, "normal")
        self.queue_wait.labels(priority).observe(wait_s)
        if error is not None:
            self.rejections.labels(str(error.reason)).inc()

    def finished(
        self,
        facts: RequestFacts,
        worker_id: str,
        cost: CallCost | None,
        ttft_s: float,
        total_s: float,
    ) -> None:
        if cost is None or not cost.tokens:
            return
        _, gap, tokens = self._per_model(self._model(facts.model))
        tokens.inc(cost.tokens)
        if cost.tokens > 1:
            gap.observe((total_s - ttft_s) / (cost.tokens - 1))


class _ScrapeTime(Collector):
    """Gauges read when Prometheus scrapes: the fleet, the registry view, the queue."""

    def __init__(self, view: ObservedView, admission: AdmissionQueue) -> None:
        self._view = view
        self._admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "meshserve_gateway_queue_length",
            "Calls waiting for a worker with room, by priority.",
            labels=["priority"],
        )
        for name, n in self._admission.waiting_by_priority().items():
            queue.add_metric([name], n)
        yield queue
        workers = GaugeMetricFamily(
            "meshserve_gateway_workers", "Workers in the registry view, by state.", labels=["state"]
        )
        states = {s.value: 0 for s in WorkerState}
        for w in list(self._view.workers.values()):
            states[w.state.value] += 1
        for state, n in states.items():
            workers.add_metric([state], n)
        yield workers
        ready = GaugeMetricFamily(
            "meshserve_gateway_model_ready_replicas",
            "Workers serving each model (READY and not draining).",
            labels=["model"],
        )
        counts: dict[str, int] = {}
        for w in list(self._view.workers.values()):
            for m in w.models:
                ok = m.state is ModelState.READY and w.state is WorkerState.SERVING
                counts[m.name] = counts.get(m.name, 0) + int(ok)
        for model, n in sorted(counts.items()):
            ready.add_metric([model], n)
        yield ready
        yield GaugeMetricFamily(
            "meshserve_gateway_registry_connected",
            "1 while the registry view's etcd session is up, 0 while serving the last view.",
            value=1.0 if self._view.connected else 0.0,
        )
        age = self._view.staleness_s()
        yield GaugeMetricFamily(
            "meshserve_gateway_registry_view_age_seconds",
            "Seconds since etcd last answered the view (-1: never).",
            value=-1.0 if age is None else age,
        )
