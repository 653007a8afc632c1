"""In-band load reports: the LoadSnapshot dataclass and its ORCA-compatible codec.

Workers attach one to every response (trailing metadata, and the initial
metadata of streams); gateways read them instead of scraping anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from meshserve.v1 import load_pb2

# gRPC's ORCA trailer name: Envoy and gRPC WRR clients look for this key. gRPC
# core consumes it on the client side (it never reaches Python code), so the same
# bytes also travel under our own key, which the gateway reads.
ORCA_KEY = "endpoint-load-metrics-bin"
LOAD_KEY = "x-meshserve-load-bin"


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    inflight: int  # admitted on the worker (running + queued)
    running: int = 0  # in engines
    queue_depth: int = 0  # waiting inside engines for a slot
    capacity: int = 0  # admitted at most
    slots: int = 0  # run concurrently at full speed (0: unknown)
    kv_cache_use: float = 0.0
    produced_at_ms: int = 0  # worker wall clock


@dataclass(frozen=True, slots=True)
class CallCost:
    """What one call cost the worker (ORCA request_cost): engine time excluding any
    wait for a slot, and the work done in units of a typical call."""

    service_s: float
    work: float
    tokens: int = 0  # tokens generated (Generate calls)


def encode(s: LoadSnapshot, cost: CallCost | None = None) -> bytes:
    report = to_pb(s)
    if cost is not None:
        report.request_cost["service_ms"] = cost.service_s * 1000
        report.request_cost["work"] = cost.work
        if cost.tokens:
            report.request_cost["tokens"] = cost.tokens
    return report.SerializeToString()


def to_pb(s: LoadSnapshot) -> load_pb2.LoadReport:
    util = max(0.0, min(1.0, s.inflight / s.capacity)) if s.capacity else 0.0
    return load_pb2.LoadReport(
        application_utilization=util,
        utilization={"kv_cache": s.kv_cache_use},
        named_metrics={
            "inflight": float(s.inflight),
            "running": float(s.running),
            "queue_depth": float(s.queue_depth),
            "capacity": float(s.capacity),
            "slots": float(s.slots),
            "kv_cache_use": s.kv_cache_use,
            "produced_at_ms": float(s.produced_at_ms),
        },
    )


def decode(data: bytes) -> LoadSnapshot | None:
    """None for a value that is not a load report (never raises: it is advisory)."""
    try:
        report = load_pb2.LoadReport.FromString(data)
    except DecodeError:
        return None
    return from_pb(report)


def from_pb(report: load_pb2.LoadReport) -> LoadSnapshot | None:
    m = report.named_metrics
    if "inflight" not in m:
        return None
    get = m.get  # a gateway decodes one report per call: keep this lean
    return LoadSnapshot(
        int(m["inflight"]),
        int(get("running", 0.0)),
        int(get("queue_depth", 0.0)),
        int(get("capacity", 0.0)),
        int(get("slots", 0.0)),
        float(get("kv_cache_use", 0.0)),
        int(get("produced_at_ms", 0.0)),
    )


def find(metadata: Iterable[tuple[str, str | bytes]] | None) -> LoadSnapshot | None:
    """The load report in a call's metadata, if there is one."""
    return find_with_cost(metadata)[0]


def find_with_cost(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> tuple[LoadSnapshot | None, CallCost | None]:
    """The load report in a call's metadata and the call's cost, where present."""
    for key, value in metadata or ():
        if key == LOAD_KEY and isinstance(value, bytes):
            try:
                report = load_pb2.LoadReport.FromString(value)
            except DecodeError:
                return None, None
            rc = report.request_cost
            cost = None
            work = rc.get("work", 0.0)
            if work > 0 and "service_ms" in rc:
                cost = CallCost(rc["service_ms"] / 1000, work, int(rc.get("tokens", 0.0)))
            return from_pb(report), cost
    return None, None
