"""OpenTelemetry traces: explicit spans at the seams (cheaper per call than the grpc
interceptors of opentelemetry-instrumentation-grpc: bench/edge_cost.py), W3C trace
context from the client through the gateway to the worker and its engine.

Sampling is parent-based with a ratio for roots, decided here before any span object
exists: a call the sampler would drop costs one random draw (a traceparent whose
sampled flag is off, one string check), not a NonRecordingSpan (~7-14 us each). Calls
that are sampled get real spans; only they touch the OpenTelemetry SDK.

Off unless an OTLP endpoint is configured (MESHSERVE_OTLP_ENDPOINT, or the standard
OTEL_EXPORTER_OTLP_ENDPOINT); the ratio is MESHSERVE_TRACE_SAMPLE_RATIO (default 0.01).
Only Inference and LoadReporting calls pass the edge hooks that make spans: health,
reflection and etcd calls are never traced.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshserve.edge import Call
from meshserve.errors import MeshError
from meshserve.metadata import TRACEPARENT_KEY, TRACESTATE_KEY

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.01
_PROPAGATOR = TraceContextTextMapPropagator()


def otlp_endpoint() -> str:
    return os.environ.get("MESHSERVE_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT", ""
    )


def sample_ratio() -> float:
    raw = os.environ.get("MESHSERVE_TRACE_SAMPLE_RATIO") or os.environ.get(
        "OTEL_TRACES_SAMPLER_ARG", ""
    )
    try:
        ratio = float(raw) if raw else DEFAULT_RATIO
    except ValueError:
        log.warning("trace sample ratio %r is not a number; using %s", raw, DEFAULT_RATIO)
        return DEFAULT_RATIO
    return min(1.0, max(0.0, ratio))


def _sampled_flag(traceparent: str) -> bool | None:
    """The sampled bit of a W3C traceparent ("00-<trace>-<span>-<flags>"); None if bad."""
    if len(traceparent) < 55 or traceparent[2] != "-" or traceparent[52] != "-":
        return None
    try:
        return bool(int(traceparent[53:55], 16) & 1)
    except ValueError:
        return None


class _Held:
    """A call's span and the context token that made it current."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: object) -> None:
        self.span, self.token = span, token


class Tracing:
    """The spans of one gateway or worker process (its own TracerProvider)."""

    def __init__(
        self,
        service: str,
        *,
        ratio: float = DEFAULT_RATIO,
        processors: Sequence[SpanProcessor] = (),
        rng: random.Random | None = None,
    ) -> None:
        # ALWAYS_ON: the sampling decision was made in begin() (see the module doc).
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service}), sampler=ALWAYS_ON
        )
        for p in processors:
            self.provider.add_span_processor(p)
        self.tracer = self.provider.get_tracer("meshserve")
        self.ratio = ratio
        self._rng = rng or random.Random()

    @classmethod
    def from_env(cls, service: str) -> Tracing | None:
        endpoint = otlp_endpoint()
        if not endpoint:
            return None
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not endpoint.startswith("https://")
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
        return cls(service, ratio=sample_ratio(), processors=[BatchSpanProcessor(exporter)])

    def shutdown(self) -> None:
        """Export what is buffered, then stop (at process shutdown)."""
        self.provider.shutdown()

    # -- EdgeHook --------------------------------------------------------------
    def begin(self, call: Call) -> None:
        parent = call.metadata.get(TRACEPARENT_KEY)
        if parent is None:
            if self._rng.random() >= self.ratio:
                return
            ctx = None
        else:
            if not _sampled_flag(parent):
                return  # the caller's trace is not sampled (or the header is bad)
            ctx = _PROPAGATOR.extract(call.metadata)
        span = self.tracer.start_span(
            f"meshserve.v1.{call.method}", context=ctx, kind=SpanKind.SERVER
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        call.span = _Held(span, token)

    def end(self, call: Call, code: str, error: MeshError | None) -> None:
        held = call.span
        if not isinstance(held, _Held):
            return
        span, token = held.span, held.token
        call.span = None
        span.set_attribute("rpc.system", "grpc")
        span.set_attribute("rpc.grpc.status_code", code)
        span.set_attribute("meshserve.request_id", call.request_id)
        if call.model:
            span.set_attribute("meshserve.model", call.model)
        if call.worker_id:
            span.set_attribute("meshserve.worker", call.worker_id)
        if call.first_at:
            span.set_attribute("meshserve.ttft_ms", (call.first_at - call.started) * 1000)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{code}: {error.reason}"))
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]  # the token attach() gave


def current_span() -> Span | None:
    """The recording span of this task's call, if it is being traced."""
    span = trace.get_current_span()
    return span if span.is_recording() else None


def child_span(
    tracer: trace.Tracer, name: str, start_ns: int, end_ns: int, **attributes: Any
) -> None:
    """A finished child of the current span from recorded times (queue, prefill...)."""
    span = tracer.start_span(name, start_time=start_ns)
    for key, value in attributes.items():
        span.set_attribute(f"meshserve.{key}", value)
    span.end(end_time=end_ns)


def ago_ns(seconds: float, now_ns: int | None = None) -> int:
    """The wall-clock time `seconds` ago, in ns (span timestamps are wall clock)."""
    return (now_ns if now_ns is not None else time.time_ns()) - int(seconds * 1e9)


def inject(
    metadata: tuple[tuple[str, str], ...], ctx: otel_context.Context | None = None
) -> tuple[tuple[str, str], ...]:
    """`metadata` with the trace context of `ctx` (default: the current one) instead
    of the caller's."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    kept = tuple(kv for kv in metadata if kv[0] not in (TRACEPARENT_KEY, TRACESTATE_KEY))
    return kept + tuple(carrier.items())
