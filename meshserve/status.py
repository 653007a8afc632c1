"""The single table between MeshError and gRPC status codes, used at every edge."""

from __future__ import annotations

import logging

import grpc

from meshserve.errors import ErrorCode, Internal, MeshError

log = logging.getLogger(__name__)

_TO_GRPC: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FROM_GRPC: dict[grpc.StatusCode, ErrorCode] = {v: k for k, v in _TO_GRPC.items()}
# Codes without a domain twin: UNKNOWN/DATA_LOSS are internal faults, ABORTED and
# UNIMPLEMENTED mean "this peer cannot do it" (e.g. an old worker).
_FROM_GRPC.update(
    {
        grpc.StatusCode.UNKNOWN: ErrorCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS: ErrorCode.INTERNAL,
        grpc.StatusCode.ABORTED: ErrorCode.UNAVAILABLE,
        grpc.StatusCode.UNIMPLEMENTED: ErrorCode.UNAVAILABLE,
        grpc.StatusCode.OUT_OF_RANGE: ErrorCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS: ErrorCode.FAILED_PRECONDITION,
    }
)


def to_grpc_code(code: ErrorCode) -> grpc.StatusCode:
    return _TO_GRPC[code]


def from_rpc_error(exc: grpc.RpcError, *, peer: str = "") -> MeshError:
    """Translate an error from a downstream call into a MeshError (keeps the message)."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    status = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else None) or status.name
    domain = _FROM_GRPC.get(status, ErrorCode.INTERNAL)
    if status == grpc.StatusCode.UNAVAILABLE and peer:
        details = f"worker {peer} unavailable: {details}"
    return MeshError(details, code=domain)


def as_mesh_error(exc: BaseException) -> MeshError:
    """Any exception as a MeshError; unknown ones are logged and hidden behind INTERNAL."""
    if isinstance(exc, MeshError):
        return exc
    log.exception("unexpected error", exc_info=exc)
    return Internal("internal error; see the server log")


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Finish the RPC with the status for `exc` (raises, as context.abort does)."""
    err = as_mesh_error(exc)
    await context.abort(to_grpc_code(err.code), err.message)
