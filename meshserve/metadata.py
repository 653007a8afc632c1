"""gRPC metadata keys meshserve reads or writes (lower-case, as gRPC requires). The edge
(meshserve.edge) is the one reader of a call's metadata."""

from __future__ import annotations

REQUEST_ID_KEY = "x-request-id"
# Which worker served the call; sent in the response's trailing metadata.
WORKER_ID_KEY = "x-meshserve-worker"
# Per-request routing policy override (a name from gateway.scheduler.POLICY_NAMES).
POLICY_KEY = "x-meshserve-policy"
# W3C trace context, passed from the client through the gateway to the worker.
TRACEPARENT_KEY = "traceparent"
TRACESTATE_KEY = "tracestate"
