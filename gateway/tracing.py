"""The router's spans (for sampled calls only): queueing, scheduling, forwarding to a
worker (a CLIENT span whose context the worker continues) and the time to its first
response."""

from __future__ import annotations

import time

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.observe import NO_ATTEMPT, AttemptHook, NoRouterObserver
from gateway.scheduler.types import RequestFacts
from gateway.transport import Metadata
from meshserve.errors import MeshError
from meshserve.load import CallCost
from meshserve.tracing import Tracing, ago_ns, child_span, current_span, inject


class _Forward:
    __slots__ = ("_span", "_start_ns", "_tracer")

    def __init__(self, tracer: trace.Tracer, span: Span, start_ns: int) -> None:
        self._tracer, self._span, self._start_ns = tracer, span, start_ns

    def first_response(self, ttft_s: float) -> None:
        ctx = trace.set_span_in_context(self._span)
        token = otel_context.attach(ctx)
        try:
            child_span(self._tracer, "time_to_first_token", self._start_ns, time.time_ns())
        finally:
            otel_context.detach(token)
        self._span.set_attribute("meshserve.ttft_ms", ttft_s * 1000)

    def ended(self, error: MeshError | None) -> None:
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, f"{error.code.value}: {error.reason}"))
        self._span.end()


class RouterTracer(NoRouterObserver):
    def __init__(self, tracing: Tracing, policy_name: str) -> None:
        self._tracer = tracing.tracer
        self._policy = policy_name

    def picked(self, facts: RequestFacts, worker_id: str, decision_s: float) -> None:
        if current_span() is None:
            return
        now = time.time_ns()
        child_span(
            self._tracer, "schedule", ago_ns(decision_s, now), now,
            worker=worker_id, policy=facts.policy or self._policy, model=facts.model,
        )  # fmt: skip

    def queued(self, facts: RequestFacts, wait_s: float, error: MeshError | None) -> None:
        if current_span() is None:
            return
        now = time.time_ns()
        outcome = "admitted" if error is None else str(error.reason)
        child_span(
            self._tracer, "queue", ago_ns(wait_s, now), now,
            priority=facts.priority, outcome=outcome,
        )  # fmt: skip

    def attempt(
        self, facts: RequestFacts, worker_id: str, metadata: Metadata
    ) -> tuple[AttemptHook, Metadata]:
        if current_span() is None:
            return NO_ATTEMPT, metadata
        start = time.time_ns()
        span = self._tracer.start_span("forward", kind=SpanKind.CLIENT, start_time=start)
        span.set_attribute("meshserve.worker", worker_id)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            md = inject(metadata)  # the worker's server span becomes a child of this one
        finally:
            otel_context.detach(token)
        return _Forward(self._tracer, span, start), md

    def retried(self, facts: RequestFacts, worker_id: str, error: MeshError) -> None:
        span = current_span()
        if span is not None:
            span.add_event("retry", {"worker": worker_id, "reason": str(error.reason)})

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
