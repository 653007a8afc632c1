"""The scheduler's inputs and its one interface. Pure data: no I/O, no clock."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Candidate:
    """One worker as the scheduler sees it for one request.

    Load comes from two places: the worker's last in-band report (`reported_*`,
    possibly stale) and this gateway's own accounting (`sent_since_report`: calls
    this gateway started on that worker after the report was produced and that
    the report therefore cannot include). Policies that correct stale load use
    `inflight_estimate`; naive ones use `reported_inflight` alone.
    """

    worker_id: str
    slots: int  # concurrent requests the worker runs at full speed (its capacity, >= 1)
    reported_inflight: int = 0  # running + queued on the worker, per its last report
    sent_since_report: int = 0  # this gateway's calls started since that report
    gateway_inflight: int = 0  # this gateway's calls on that worker right now
    queue_depth: int = 0  # waiting beyond `slots`, per the last report
    service_time: float = 0.0  # EWMA seconds per request of this model there (0: unknown)
    ttft: float = 0.0  # EWMA seconds to first token (0: unknown)
    service_age: float = 0.0  # seconds since service_time was last measured
    kv_cache_use: float = 0.0  # fraction in [0, 1], per the last report
    error_rate: float = 0.0  # recent failures / attempts, in [0, 1]
    report_age: float = 0.0  # seconds since the last report was produced
    weight: float = 1.0  # static capacity weight (e.g. relative speed), > 0

    @property
    def inflight_estimate(self) -> int:
        """Stale-corrected load: the report plus what we sent since."""
        return self.reported_inflight + self.sent_since_report


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What routing knows of one request: read once from it at the edge (the payload
    itself is never re-encoded), used by the router and the policy alike."""

    model: str
    session_id: str = ""
    priority: int = 0  # 0 unspecified/normal, 1 high, 2 normal, 3 low (proto enum values)
    size_hint: float = 1.0  # relative expected work of this request (1.0 = typical)
    request_id: str = ""
    policy: str = ""  # per-request override of the gateway's policy ("" = default)
    min_tokens: int = 0  # prompt + completion tokens the request needs at least


class Policy(Protocol):
    """Ranks candidates: the primary first, then fallbacks the Router uses on failure.

    `candidates` may be a lazy sequence: sampling policies must index only what they
    sample (the decision must stay O(sample) for 1,000-worker fleets). Policies may
    keep internal state (a round-robin cursor) but never read a clock or do I/O.
    """

    name: str

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]: ...
