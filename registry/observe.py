"""The registry's telemetry hook: what EtcdRegistry reports about its etcd calls.

No-op by default; benchmarks (and later metrics) pass their own observer. The `op`
names are stable (metric label values): one per kind of etcd call, retries included.
"""

from __future__ import annotations

from typing import Protocol

LEASE_GRANT = "lease_grant"
LEASE_REVOKE = "lease_revoke"
LEASE_KEEPALIVE = "lease_keepalive"
PUT = "put"  # a worker record or an alias
LIST = "list"  # the whole registry prefix
DELETE = "delete"  # an alias


class RegistryObserver(Protocol):
    def on_call(self, op: str, seconds: float, ok: bool) -> None:
        """One etcd operation ended: `seconds` from its start (all retries) to its end;
        `ok` False when it raised (etcd unavailable, or cancelled)."""

    def on_keepalive(self, lease_id: int, ttl: int, seconds: float) -> None:
        """etcd answered a lease keep-alive: the TTL it reports (<= 0: the lease is
        gone) after `seconds`. Every attempt, answered or not, is also an on_call."""


class NoRegistryObserver:
    def on_call(self, op: str, seconds: float, ok: bool) -> None:
        pass

    def on_keepalive(self, lease_id: int, ttl: int, seconds: float) -> None:
        pass


NO_REGISTRY_OBSERVER = NoRegistryObserver()
