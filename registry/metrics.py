"""Prometheus metrics of a process's etcd calls (registry.observe's hook)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 3, 10)


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "meshserve_registry_requests",
            "etcd operations by kind and outcome (ok / error).",
            ["op", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "meshserve_registry_request_duration_seconds",
            "etcd operation duration, retries included.",
            ["op"],
            buckets=ETCD_BUCKETS,
            registry=registry,
        )

    def on_call(self, op: str, seconds: float, ok: bool) -> None:
        self.calls.labels(op, "ok" if ok else "error").inc()
        self.duration.labels(op).observe(seconds)

    def on_keepalive(self, lease_id: int, ttl: int, seconds: float) -> None:
        pass  # counted by on_call
