"""MeshError <-> gRPC status with `google.rpc.Status` details: the one table, used at
every edge (servers) and where a downstream call's error enters (the forwarder)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from meshserve.errors import DOMAIN, ErrorCode, Internal, MeshError

log = logging.getLogger(__name__)

# Where gRPC carries a google.rpc.Status (grpcio-status reads and writes this key).
DETAILS_KEY = "grpc-status-details-bin"

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

Trailers = Sequence[tuple[str, str | bytes]]


def to_grpc_code(code: ErrorCode) -> grpc.StatusCode:
    return _TO_GRPC[code]


def _pack(msg: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)  # type: ignore[arg-type]
    return packed


def to_rpc_status(err: MeshError) -> status_pb2.Status:
    """The google.rpc.Status of `err`: a downstream peer's details as they came, else
    ErrorInfo (+ RetryInfo with a delay, + BadRequest with field violations)."""
    code = to_grpc_code(err.code).value[0]
    st = status_pb2.Status(code=code, message=err.message)
    if err.upstream is not None:
        try:
            st.details.extend(status_pb2.Status.FromString(err.upstream).details)
            return st
        except DecodeError:
            pass  # not a Status after all: describe the error ourselves
    info = error_details_pb2.ErrorInfo(reason=str(err.reason), domain=DOMAIN)
    info.metadata.update(err.metadata)
    st.details.append(_pack(info))
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after_s * 1e9))
        st.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in err.violations
            ]
        )
        st.details.append(_pack(bad))
    return st


def details_trailer(err: MeshError) -> tuple[str, bytes]:
    return (DETAILS_KEY, to_rpc_status(err).SerializeToString())


def from_rpc_error(exc: grpc.RpcError, *, peer: str = "") -> MeshError:
    """A downstream call's error as a MeshError: same code and message, its reason from
    the peer's ErrorInfo, its status details kept for passing on unchanged."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    trailers_fn = getattr(exc, "trailing_metadata", None)
    status = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or status.name
    domain = _FROM_GRPC.get(status, ErrorCode.INTERNAL)
    upstream = None
    for key, value in (trailers_fn() if callable(trailers_fn) else None) or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            upstream = value
            break
    if upstream is None and status == grpc.StatusCode.UNAVAILABLE and peer:
        # No details: the transport failed (connection refused, reset), not the worker's
        # own code; say which worker.
        message = f"worker {peer} unavailable: {message}"
    err = MeshError(message, code=domain, upstream=upstream)
    reason = reason_of(upstream) if upstream is not None else None
    if reason:
        err.reason = reason
    elif domain is ErrorCode.UNAVAILABLE:
        err.reason = "WORKER_UNAVAILABLE"
    return err


def parse_details(data: bytes) -> status_pb2.Status | None:
    try:
        return status_pb2.Status.FromString(data)
    except DecodeError:
        return None


def reason_of(data: bytes) -> str:
    """The ErrorInfo reason in a serialized google.rpc.Status ("" if none)."""
    st = parse_details(data)
    for detail in st.details if st is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def as_mesh_error(exc: BaseException) -> MeshError:
    """Any exception as a MeshError; unknown ones are logged and hidden behind INTERNAL."""
    if isinstance(exc, MeshError):
        return exc
    log.exception("unexpected error", exc_info=exc)
    return Internal("internal error; see the server log")
