"""gRPC metadata keys meshserve reads or writes (lower-case, as gRPC requires)."""

from __future__ import annotations

from typing import Any

REQUEST_ID_KEY = "x-request-id"
# Which worker served the call; sent in the response's initial metadata.
WORKER_ID_KEY = "x-meshserve-worker"
# Per-request routing policy override (a name from gateway.scheduler.POLICY_NAMES).
POLICY_KEY = "x-meshserve-policy"


def metadata_value(context: Any, key: str) -> str | None:
    """The first value of `key` in the call's invocation metadata, if any."""
    for item in context.invocation_metadata() or ():
        if item.key == key:
            value = item.value
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
