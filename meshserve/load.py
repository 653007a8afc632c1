"""In-band load reports: the LoadSnapshot dataclass and its ORCA-compatible codec.

Workers attach one to every response (trailing metadata, and the initial
metadata of streams); gateways read them instead of scraping anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from meshserve.v1 import load_pb2

# gRPC's ORCA trailer name: Envoy and gRPC WRR clients look for this key.
LOAD_KEY = "endpoint-load-metrics-bin"


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    inflight: int  # admitted on the worker (running + queued)
    running: int = 0  # in engines
    queue_depth: int = 0  # waiting inside engines for a slot
    capacity: int = 0  # admitted at most
    slots: int = 0  # run concurrently at full speed (0: unknown)
    kv_cache_use: float = 0.0
    produced_at_ms: int = 0  # worker wall clock


def encode(s: LoadSnapshot) -> bytes:
    return to_pb(s).SerializeToString()


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
    return LoadSnapshot(
        inflight=int(m["inflight"]),
        running=int(m.get("running", 0.0)),
        queue_depth=int(m.get("queue_depth", 0.0)),
        capacity=int(m.get("capacity", 0.0)),
        slots=int(m.get("slots", 0.0)),
        kv_cache_use=float(m.get("kv_cache_use", 0.0)),
        produced_at_ms=int(m.get("produced_at_ms", 0.0)),
    )


def find(metadata: Iterable[tuple[str, str | bytes]] | None) -> LoadSnapshot | None:
    """The load report in a call's metadata, if there is one."""
    for key, value in metadata or ():
        if key == LOAD_KEY and isinstance(value, bytes):
            return decode(value)
    return None
