"""The fleet as one gateway sees it, for operators: the admin RPCs and the fleet page
are both views of `fleet_snapshot` (plain data, no protobuf, no HTML)."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from gateway.router import Router
from gateway.routing import RouteExplanation
from gateway.scheduler.estimates import gateway_share, predicted_completion, service_prior
from gateway.scheduler.explain import explain
from gateway.scheduler.types import RequestFacts
from gateway.stats import Candidates, fitting
from registry.records import WorkerRecord

SHARE_WINDOW_S = 10.0


class TrafficMeter:
    """Each worker's share of this gateway's attempts over the last `window_s` seconds,
    from the router's per-worker send counters, sampled whenever someone asks (the fleet
    page polls every second; one-off questions get the share since the previous one)."""

    def __init__(
        self, window_s: float = SHARE_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window_s
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def shares(self, totals: Mapping[str, int]) -> dict[str, float]:
        now = self._clock()
        self._samples.append((now, dict(totals)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        _, old = self._samples[0]
        sent = {wid: n - old.get(wid, 0) for wid, n in totals.items()}
        if len(self._samples) == 1:  # the first question: since the start
            sent = dict(totals)
        total = sum(sent.values())
        return {wid: (n / total if total else 0.0) for wid, n in sent.items()}


@dataclass(frozen=True)
class ModelView:
    name: str
    kind: str
    state: str
    backend: str
    service_time_s: float  # this gateway's EWMA, per unit of work (0: no calls yet)
    ttft_s: float


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    address: str
    device: str
    device_name: str
    device_memory_bytes: int
    state: str
    models: tuple[ModelView, ...]
    capacity: int
    inflight_estimate: int
    gateway_inflight: int
    queue_depth: int
    slots: int
    kv_cache_use: float
    report_age_s: float  # -1: no report yet
    error_rate: float
    traffic_share: float
    ejected: bool
    version: str
    start_time: datetime
    labels: Mapping[str, str] = field(default_factory=dict)


def worker_view(w: WorkerRecord, router: Router, share: float, now: float) -> WorkerView:
    st = router.known_stats(w.worker_id)
    models = tuple(
        ModelView(
            m.name,
            m.kind.value,
            m.state.value,
            m.backend,
            st.service_time.get(m.name, 0.0) if st else 0.0,
            st.ttft.get(m.name, 0.0) if st else 0.0,
        )
        for m in w.models
    )
    return WorkerView(
        worker_id=w.worker_id,
        address=w.address,
        device=w.device.label,
        device_name=w.device.name,
        device_memory_bytes=w.device.memory_bytes,
        state=w.state.value,
        models=models,
        capacity=w.capacity,
        inflight_estimate=(st.reported_inflight + st.sent_since_report) if st else 0,
        gateway_inflight=st.inflight if st else 0,
        queue_depth=st.queue_depth if st else 0,
        slots=st.slots if st else 0,
        kv_cache_use=st.kv_cache_use if st else 0.0,
        report_age_s=(now - st.report_at) if st and st.report_at else -1.0,
        error_rate=st.error_rate if st else 0.0,
        traffic_share=share,
        ejected=router.ejected(w.worker_id),
        version=w.version,
        start_time=w.start_time,
        labels=dict(w.labels),
    )


def fleet_snapshot(
    workers: Mapping[str, WorkerRecord],
    router: Router,
    meter: TrafficMeter,
    clock: Callable[[], float] = time.monotonic,
) -> list[WorkerView]:
    """Every worker in the view, by id."""
    ordered = sorted(workers.values(), key=lambda w: w.worker_id)
    totals = {}
    for w in ordered:
        st = router.known_stats(w.worker_id)
        totals[w.worker_id] = st.sent_total if st else 0
    shares = meter.shares(totals)
    now = clock()
    return [worker_view(w, router, shares.get(w.worker_id, 0.0), now) for w in ordered]


def explain_route(router: Router, facts: RequestFacts) -> RouteExplanation:
    """What the router would do for such a request now, and why (an operator's question:
    nothing is sent, no state moves). Raises NotFound/Unavailable like a call would."""
    model = router.resolve(facts.model)
    facts = replace(facts, model=model)
    ready = router.ready(model)
    if not ready:
        raise router.no_worker(model)
    now = router.now()
    ejected = {w.worker_id for w in ready if router.ejected(w.worker_id)}
    short = {w.worker_id for w in ready} - {
        w.worker_id for w in fitting(ready, model, facts.min_tokens)
    }
    policy = router.policies.get(facts.policy)
    cands = Candidates(ready, router.stats, model, now)
    return RouteExplanation(
        model=model,
        policy=policy.name,
        candidates=explain(policy, facts, cands, random.Random()),
        ejected=frozenset(ejected),
        too_short=frozenset(short),
    )


def top_scores(router: Router, facts: RequestFacts) -> list[tuple[str, float]]:
    """The ready workers by predicted completion time, best first (for traces)."""
    cands = list(Candidates(router.ready(facts.model), router.stats, facts.model, router.now()))
    prior, share = service_prior(cands), gateway_share(cands)
    scored = [(c.worker_id, predicted_completion(c, prior, facts.size_hint, share)) for c in cands]
    return sorted(scored, key=lambda ws: ws[1])
