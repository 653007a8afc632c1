"""The one transport-neutral error hierarchy of meshserve.

Every layer raises these; each server's edge maps them to a gRPC status with
`google.rpc.Status` details in one place (`meshserve.status`). Foreign errors are
translated where they enter. `classify` is the one table of what an error means for
routing: the caller's fault, a fault of the worker, worth another worker.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# ErrorInfo.domain of every error meshserve itself raises.
DOMAIN = "meshserve"


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class Reason(enum.StrEnum):
    """Stable machine-readable causes (ErrorInfo.reason); docs/api.md lists them."""

    INVALID_REQUEST = "INVALID_REQUEST"
    UNKNOWN_POLICY = "UNKNOWN_POLICY"
    WRONG_RPC = "WRONG_RPC"  # a generate model called with Infer, or the reverse
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    NO_READY_WORKER = "NO_READY_WORKER"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    WORKER_DRAINING = "WORKER_DRAINING"
    GATEWAY_DRAINING = "GATEWAY_DRAINING"  # a call still open when a gateway's drain ran out
    WORKER_UNAVAILABLE = "WORKER_UNAVAILABLE"
    WORKER_AT_CAPACITY = "WORKER_AT_CAPACITY"
    MODEL_AT_CAPACITY = "MODEL_AT_CAPACITY"
    QUEUE_FULL = "QUEUE_FULL"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    ENGINE_ERROR = "ENGINE_ERROR"
    REGISTRY_UNAVAILABLE = "REGISTRY_UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class ErrorClass(enum.Flag):
    NONE = 0
    CLIENT = enum.auto()  # the caller's doing: never counts against a worker
    WORKER_FAULT = enum.auto()  # says something about the worker's health
    RETRYABLE = enum.auto()  # another worker may well succeed (before the first response)


_C, _W, _R = ErrorClass.CLIENT, ErrorClass.WORKER_FAULT, ErrorClass.RETRYABLE
# The one classification: the router (retry, eject, health), the scheduler's error
# rate and metrics all read this table.
CLASSIFICATION: Mapping[ErrorCode, ErrorClass] = {
    ErrorCode.INVALID_ARGUMENT: _C,
    # From a worker: our view of it was stale (it no longer has the model), so another
    # worker may have it; the request was not at fault, nor was the worker's health.
    # From the gateway itself (no worker lists the model) it is final: nothing to retry.
    ErrorCode.NOT_FOUND: _C | _R,
    ErrorCode.FAILED_PRECONDITION: _C,
    ErrorCode.PERMISSION_DENIED: _C,
    ErrorCode.UNAUTHENTICATED: _C,
    ErrorCode.CANCELLED: _C,
    ErrorCode.DEADLINE_EXCEEDED: _C,
    ErrorCode.UNAVAILABLE: _W | _R,
    ErrorCode.RESOURCE_EXHAUSTED: _R,
    ErrorCode.INTERNAL: _W,
}


def classify(code: ErrorCode) -> ErrorClass:
    return CLASSIFICATION.get(code, ErrorClass.WORKER_FAULT)


# Default RetryInfo delay by code, in seconds (None: no RetryInfo).
_RETRY_AFTER_S: Mapping[ErrorCode, float] = {
    ErrorCode.RESOURCE_EXHAUSTED: 0.5,
    ErrorCode.UNAVAILABLE: 1.0,
}


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str  # path of the offending request field, e.g. "sampling.top_p"
    description: str


class MeshError(Exception):
    """Base of every meshserve error. `message` is safe to show to a caller.

    `reason`, `metadata`, `retry_after_s` and `violations` become the status details
    (ErrorInfo, RetryInfo, BadRequest). `upstream` holds the serialized
    `google.rpc.Status` a downstream peer sent: its details are passed on unchanged."""

    code: ErrorCode = ErrorCode.INTERNAL
    reason: str = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
        field: str | None = None,
        violations: Sequence[FieldViolation] = (),
        upstream: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata) if metadata else {}
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else _RETRY_AFTER_S.get(self.code)
        )
        if field is not None:
            violations = (FieldViolation(field, message), *violations)
        self.violations = tuple(violations)
        self.upstream = upstream

    @property
    def error_class(self) -> ErrorClass:
        return classify(self.code)

    @property
    def is_client_error(self) -> bool:
        return ErrorClass.CLIENT in classify(self.code)

    @property
    def retryable(self) -> bool:
        return ErrorClass.RETRYABLE in classify(self.code)

    @property
    def worker_fault(self) -> bool:
        return ErrorClass.WORKER_FAULT in classify(self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value}/{self.reason}: {self.message!r})"


class InvalidArgument(MeshError):
    code = ErrorCode.INVALID_ARGUMENT
    reason = Reason.INVALID_REQUEST


class NotFound(MeshError):
    code = ErrorCode.NOT_FOUND
    reason = Reason.MODEL_NOT_FOUND


class Unavailable(MeshError):
    code = ErrorCode.UNAVAILABLE
    reason = Reason.WORKER_UNAVAILABLE


class ResourceExhausted(MeshError):
    code = ErrorCode.RESOURCE_EXHAUSTED
    reason = Reason.WORKER_AT_CAPACITY


class DeadlineExceeded(MeshError):
    code = ErrorCode.DEADLINE_EXCEEDED
    reason = Reason.DEADLINE_EXCEEDED


class Cancelled(MeshError):
    code = ErrorCode.CANCELLED
    reason = Reason.CANCELLED


class FailedPrecondition(MeshError):
    code = ErrorCode.FAILED_PRECONDITION
    reason = Reason.FAILED_PRECONDITION


class Internal(MeshError):
    code = ErrorCode.INTERNAL
    reason = Reason.INTERNAL


class RegistryUnavailable(Unavailable):
    """etcd could not be reached."""

    reason = Reason.REGISTRY_UNAVAILABLE
