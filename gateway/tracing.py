"""The router's spans (for sampled calls only): queueing, scheduling (the chosen worker,
the policy and the best candidates' predicted completion times), forwarding to a worker
(a CLIENT span whose context the worker continues) and the time to its first response.

Parents are passed explicitly (no context attach/detach): this runs for every sampled
call, and each attach costs a context copy."""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.observe import NO_ATTEMPT, AttemptHook, NoRouterObserver
from gateway.scheduler.types import RequestFacts
from gateway.transport import Metadata
from meshserve.errors import MeshError
from meshserve.load import CallCost
from meshserve.tracing import Tracing, ago_ns, current_span, inject

TopScores = Callable[[RequestFacts], list[tuple[str, float]]]
TOP = 3  # candidates named on a schedule span


class _Forward:
    __slots__ = ("_span", "_start_ns", "_tracer")

    def __init__(self, tracer: trace.Tracer, span: Span, start_ns: int) -> None:
        self._tracer, self._span, self._start_ns = tracer, span, start_ns

    def first_response(self, ttft_s: float) -> None:
        ctx = trace.set_span_in_context(self._span)
        ttft = self._tracer.start_span("time_to_first_token", ctx, start_time=self._start_ns)
        ttft.end()
        self._span.set_attribute("meshserve.ttft_ms", ttft_s * 1000)

    def ended(self, error: MeshError | None) -> None:
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, f"{error.code.value}: {error.reason}"))
        self._span.end()


class RouterTracer(NoRouterObserver):
    def __init__(self, tracing: Tracing, policy_name: str, top_scores: TopScores) -> None:
        self._tracer = tracing.tracer
        self._policy = policy_name
        self._top = top_scores

    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        parent = current_span()
        if parent is None:
            return
        now = time.time_ns()
        ctx = trace.set_span_in_context(parent)
        span = self._tracer.start_span("schedule", ctx, start_time=ago_ns(decision_s, now))
        span.set_attribute("meshserve.worker", worker_id)
        span.set_attribute("meshserve.policy", facts.policy or self._policy)
        span.set_attribute("meshserve.model", facts.model)
        for i, (wid, seconds) in enumerate(self._top(facts)[:TOP]):
            span.set_attribute(f"meshserve.candidate.{i}", f"{wid} {seconds * 1000:.3f}ms")
        span.end(end_time=now)

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        parent = current_span()
        if parent is None:
            return
        now = time.time_ns()
        ctx = trace.set_span_in_context(parent)
        span = self._tracer.start_span("queue", ctx, start_time=ago_ns(wait_s, now))
        span.set_attribute("meshserve.priority", facts.priority)
        span.set_attribute("meshserve.outcome", "admitted" if error is None else str(error.reason))
        span.end(end_time=now)

    def attempt(
        self, facts: RequestFacts, worker_id: str, metadata: Metadata
    ) -> tuple[AttemptHook, Metadata]:
        parent = current_span()
        if parent is None:
            return NO_ATTEMPT, metadata
        start = time.time_ns()
        ctx = trace.set_span_in_context(parent)
        span = self._tracer.start_span("forward", ctx, kind=SpanKind.CLIENT, start_time=start)
        span.set_attribute("meshserve.worker", worker_id)
        # The worker's server span becomes a child of this one.
        md = inject(metadata, trace.set_span_in_context(span))
        return _Forward(self._tracer, span, start), md

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        span = current_span()
        if span is not None:
            span.add_event("retry", {"worker": worker_id, "reason": str(error.reason)})

    def retry_refused(self, facts: RequestFacts, error: MeshError) -> None:
        span = current_span()
        if span is not None:
            span.add_event("retry budget spent", {"reason": str(error.reason)})

    def ejected(self, worker_id: str, error: MeshError) -> None:
        pass  # not part of one call: metrics and the log say it

    def finished(
        self,
        facts: RequestFacts,
        worker_id: str,
        cost: CallCost | None,
        ttft_s: float,
        total_s: float,
    ) -> None:
        span = current_span()
        if span is not None and cost is not None:
            span.set_attribute("meshserve.tokens", cost.tokens)
            span.set_attribute("meshserve.worker_service_ms", cost.service_s * 1000)
