"""The sampling decision at the edge, and the spans of one traced call (in memory)."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshserve.edge import Call
from meshserve.errors import InvalidArgument
from meshserve.tracing import Tracing, _sampled_flag, inject


class Ctx:
    def __init__(self, md: dict[str, str]) -> None:
        self._md = md

    def invocation_metadata(self) -> list[object]:
        class Item:
            def __init__(self, key: str, value: str) -> None:
                self.key, self.value = key, value

        return [Item(k, v) for k, v in self._md.items()]


PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("header", "sampled"),
    [
        (PARENT, True),
        (PARENT[:-2] + "00", False),
        (PARENT[:-2] + "03", True),
        ("garbage", None),
        (PARENT[:-2] + "zz", None),
    ],
)
def test_sampled_flag(header: str, sampled: bool | None) -> None:
    assert _sampled_flag(header) == sampled


def _tracing(ratio: float) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    t = Tracing("t", ratio=ratio, processors=[SimpleSpanProcessor(exporter)], rng=random.Random(1))
    return t, exporter


def test_roots_are_sampled_at_the_ratio_and_parents_decide_for_their_children() -> None:
    t, exporter = _tracing(0.25)
    for _ in range(4000):
        call = Call.from_context("Infer", Ctx({}))
        t.begin(call)
        t.end(call, "OK", None)
    assert 800 < len(exporter.get_finished_spans()) < 1200
    exporter.clear()
    t.ratio = 0.0
    for header in (PARENT, PARENT[:-2] + "00"):
        call = Call.from_context("Infer", Ctx({"traceparent": header}))
        t.begin(call)
        t.end(call, "OK", None)
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT[36:52]
    assert f"{span.context.trace_id:032x}" == PARENT[3:35]


def test_a_failed_call_marks_its_span_and_children_get_its_context() -> None:
    t, exporter = _tracing(1.0)
    call = Call.from_context("Generate", Ctx({}))
    t.begin(call)
    md = inject((("x-request-id", "r"), ("traceparent", "old")))
    assert dict(md)["traceparent"] != "old" and dict(md)["x-request-id"] == "r"
    call.model = "m"
    t.end(call, "INVALID_ARGUMENT", InvalidArgument("bad", field="model"))
    (span,) = exporter.get_finished_spans()
    assert span.status.description == "INVALID_ARGUMENT: INVALID_REQUEST"
    assert span.attributes is not None and span.attributes["meshserve.model"] == "m"
    assert dict(md)["traceparent"].split("-")[1] == f"{span.context.trace_id:032x}"
