"""What the gateway's and the worker's Prometheus metrics share: a registry per process
with the standard process collectors, and histogram buckets chosen for this workload."""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)

# Whole calls: embeddings take milliseconds, long generations minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time to first token: a prefill (ms) to a long queue (s).
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Between tokens: a decode step on a GPU (sub-ms) to a busy CPU (100s of ms).
GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


def process_registry() -> CollectorRegistry:
    """A registry of one gateway or worker, with the process, platform and GC metrics.

    Not prometheus_client's global REGISTRY: tests run gateways and workers in one
    process, each with its own metrics."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry
