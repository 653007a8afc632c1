"""Routing policy: pure and synchronous (no I/O, no clock, injected randomness).

`build_policy(name_or_config)` returns a fresh policy; `POLICY_NAMES` lists the shipped
ones (`latency_capacity` is the default); `with_affinity(policy)` adds bounded-load
session affinity in front of any policy.
"""

from gateway.scheduler.affinity import BoundedLoadAffinity, stable_hash, with_affinity
from gateway.scheduler.estimates import predicted_completion, service_prior
from gateway.scheduler.filters import FILTERS, Filter, healthy, kv_headroom
from gateway.scheduler.policies import (
    DEFAULT_POLICY,
    LATENCY_CAPACITY_CONFIG,
    POLICY_NAMES,
    ComposedPolicy,
    LatencyCapacity,
    PolicyConfig,
    build_policy,
    least_inflight,
)
from gateway.scheduler.scorers import SCORERS, Scorer
from gateway.scheduler.types import Candidate, Policy, RequestFacts

__all__ = [
    "DEFAULT_POLICY",
    "FILTERS",
    "LATENCY_CAPACITY_CONFIG",
    "POLICY_NAMES",
    "SCORERS",
    "BoundedLoadAffinity",
    "Candidate",
    "ComposedPolicy",
    "Filter",
    "LatencyCapacity",
    "Policy",
    "PolicyConfig",
    "RequestFacts",
    "Scorer",
    "build_policy",
    "healthy",
    "kv_headroom",
    "least_inflight",
    "predicted_completion",
    "service_prior",
    "stable_hash",
    "with_affinity",
]
