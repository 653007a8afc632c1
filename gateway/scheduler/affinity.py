"""Session affinity: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam).

A request with a `session_id` goes to the first worker clockwise from the session's hash
on a ring of virtual nodes that the filters accept and that has room: a free slot (no
queueing there, and the session keeps its cache), or else a load within `c` times the
fleet's average (computed only when a saturated worker is probed). Otherwise (no session,
or no such worker within `max_probes`) the wrapped policy decides. When a worker leaves,
only its own sessions move; when one is overloaded, its sessions spill to the next worker
on the ring, and come back when it recovers.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence

from gateway.scheduler.filters import DEFAULT_FILTERS, Filter, passes
from gateway.scheduler.pickers import sample_indices
from gateway.scheduler.types import Candidate, Policy, RequestFacts

DEFAULT_C = 1.25
DEFAULT_VNODES = 100  # ring points per worker: load share within ~10% of even
DEFAULT_MAX_PROBES = 8  # distinct workers tried before handing over to the wrapped policy
AVERAGE_SAMPLE = 32  # larger fleets estimate the average load from this many


def stable_hash(key: str) -> int:
    """64-bit hash that is the same in every process (unlike the salted `hash()`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def worker_ids(candidates: Sequence[Candidate]) -> tuple[str, ...]:
    """The ids in order. A lazy sequence may expose `worker_ids` (a tuple) to skip
    building every candidate just to read its id."""
    ids = getattr(candidates, "worker_ids", None)
    if isinstance(ids, tuple):
        return ids
    return tuple(c.worker_id for c in candidates)


class BoundedLoadAffinity:
    """Wraps any policy; see the module doc."""

    def __init__(
        self,
        inner: Policy,
        c: float = DEFAULT_C,
        *,
        vnodes: int = DEFAULT_VNODES,
        max_probes: int = DEFAULT_MAX_PROBES,
        filters: Sequence[Filter] = DEFAULT_FILTERS,
    ) -> None:
        if c < 1.0:
            raise ValueError(f"c must be >= 1 (1 means perfectly even), got {c}")
        self.inner = inner
        self.c = c
        self.name = f"{inner.name}+affinity"
        self._vnodes = vnodes
        self._max_probes = max_probes
        self._filters = tuple(filters)
        self._ids: tuple[str, ...] = ()  # the last candidates' ids, in order
        self._index: dict[str, int] = {}  # their positions in that sequence
        self._members: tuple[str, ...] = ()  # workers on the ring (a superset)
        self._points: list[int] = []  # sorted ring positions
        self._owners: list[int] = []  # index into _members of each position's worker
        self.rebuilds = 0  # observable, so tests can check the ring is cached

    def _refresh(self, candidates: Sequence[Candidate]) -> None:
        ids = worker_ids(candidates)
        if ids == self._ids:  # the common case: same fleet, same order
            return
        self._ids = ids
        self._index = {wid: i for i, wid in enumerate(ids)}
        members = set(self._members)
        # A retry that excludes a worker only hides it (it is skipped on the walk); the
        # ring changes when a new worker appears or many have gone.
        if self._index.keys() <= members and len(members) <= len(ids) + max(4, len(ids) // 4):
            return
        self._members = ids
        ring = sorted(
            (stable_hash(f"{wid}#{v}"), i) for i, wid in enumerate(ids) for v in range(self._vnodes)
        )
        self._points = [p for p, _ in ring]
        self._owners = [i for _, i in ring]
        self.rebuilds += 1

    def _average_load(self, candidates: Sequence[Candidate], rng: random.Random) -> float:
        """Requests per slot across the fleet, counting the one being placed."""
        n = len(candidates)
        if n <= 2 * AVERAGE_SAMPLE:
            seen = list(candidates)  # one pass: a lazy sequence builds each once
            extra = 1
        else:  # estimate; the request being placed is negligible at this size
            seen = [candidates[i] for i in sample_indices(n, AVERAGE_SAMPLE, rng)]
            extra = 0
        load = sum(max(0, c.inflight_estimate) for c in seen) + extra
        return load / sum(max(1, c.slots) for c in seen)

    def pick(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> str | None:
        """The session's worker, or None when no worker on its arc may take it."""
        if not request.session_id or not candidates:
            return None
        self._refresh(candidates)
        average = -1.0  # computed on first need
        start = bisect.bisect_left(self._points, stable_hash(request.session_id))
        ring_len = len(self._points)
        tried: set[int] = set()
        for step in range(ring_len):
            owner = self._owners[(start + step) % ring_len]
            if owner in tried:
                continue
            if len(tried) >= self._max_probes:
                break
            tried.add(owner)
            index = self._index.get(self._members[owner])
            if index is None:  # not a candidate this time (excluded, or gone)
                continue
            cand = candidates[index]
            if not passes(self._filters, request, cand):
                continue
            slots = max(1, cand.slots)
            if cand.inflight_estimate < slots:
                return cand.worker_id
            if average < 0:
                average = self._average_load(candidates, rng)
            # Mirrokni's capacity ceil(c * m / n), per slot so big workers hold more.
            if cand.inflight_estimate + 1 <= math.ceil(self.c * average * slots):
                return cand.worker_id
        return None

    def rank(
        self, request: RequestFacts, candidates: Sequence[Candidate], rng: random.Random
    ) -> list[str]:
        chosen = self.pick(request, candidates, rng)
        rest = self.inner.rank(request, candidates, rng)
        if chosen is None:
            return rest
        return [chosen, *(w for w in rest if w != chosen)]


def with_affinity(policy: Policy, c: float = DEFAULT_C) -> BoundedLoadAffinity:
    """`policy` with bounded-load session affinity in front of it."""
    return BoundedLoadAffinity(policy, c)
