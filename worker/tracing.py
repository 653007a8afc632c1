"""The worker's spans for the backend's own work (sampled calls only): the wait for an
engine slot, the prefill and the decode of a Generate request, as children of the
worker's server span, from the times the host recorded."""

from __future__ import annotations

import time

from meshserve.tracing import Tracing, ago_ns, child_span, current_span
from worker.observe import Generation


class HostTracer:
    def __init__(self, tracing: Tracing) -> None:
        self._tracer = tracing.tracer

    def generated(self, g: Generation) -> None:
        if current_span() is None:
            return
        end = time.time_ns()
        start = ago_ns(g.total_s, end)
        queue_end = start + int(g.queue_s * 1e9)
        child_span(self._tracer, "engine.queue", start, queue_end)
        if g.first_token_s is None:
            return
        first = start + int(g.first_token_s * 1e9)
        child_span(self._tracer, "engine.prefill", queue_end, first)
        child_span(self._tracer, "engine.decode", first, end, tokens=g.tokens)
