"""Routing policy: pure and synchronous (no I/O, no clock, injected randomness)."""

from gateway.scheduler.policy import Candidate, least_inflight

__all__ = ["Candidate", "least_inflight"]
