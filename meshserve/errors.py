"""The one transport-neutral error hierarchy of meshserve.

Every layer raises these; each server maps them to a gRPC status in one table
(`meshserve.status`). Foreign errors are translated where they enter.
"""

from __future__ import annotations

import enum


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


# Codes that are the caller's fault: they never count against a worker's health
# and are never retried on another worker.
CLIENT_ERROR_CODES = frozenset(
    {
        ErrorCode.INVALID_ARGUMENT,
        ErrorCode.NOT_FOUND,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.FAILED_PRECONDITION,
        ErrorCode.CANCELLED,
        ErrorCode.DEADLINE_EXCEEDED,
    }
)


class MeshError(Exception):
    """Base of every meshserve error. `message` is safe to show to a caller."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def is_client_error(self) -> bool:
        return self.code in CLIENT_ERROR_CODES

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value}: {self.message!r})"


class InvalidArgument(MeshError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(MeshError):
    code = ErrorCode.NOT_FOUND


class Unavailable(MeshError):
    code = ErrorCode.UNAVAILABLE


class ResourceExhausted(MeshError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(MeshError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(MeshError):
    code = ErrorCode.CANCELLED


class FailedPrecondition(MeshError):
    code = ErrorCode.FAILED_PRECONDITION


class Internal(MeshError):
    code = ErrorCode.INTERNAL


class RegistryUnavailable(Unavailable):
    """etcd could not be reached."""
