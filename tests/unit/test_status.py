"""The one table between MeshError codes and gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from meshserve import errors
from meshserve.status import as_mesh_error, from_rpc_error, to_grpc_code, to_rpc_status


class _FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc ships no types
    def __init__(
        self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, bytes], ...] = ()
    ) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code", list(errors.ErrorCode))
def test_every_code_round_trips(code: errors.ErrorCode) -> None:
    back = from_rpc_error(_FakeRpcError(to_grpc_code(code), "msg"))
    assert back.code is code
    assert back.message == "msg"


def test_unknown_exception_becomes_internal_without_leaking() -> None:
    err = as_mesh_error(ValueError("secret path /etc/x"))
    assert err.code is errors.ErrorCode.INTERNAL
    assert "secret" not in err.message


def test_client_errors_are_marked() -> None:
    assert errors.InvalidArgument("x").is_client_error
    assert errors.NotFound("x").is_client_error
    assert not errors.Unavailable("x").is_client_error
    assert not errors.ResourceExhausted("x").is_client_error


def test_unavailable_names_the_peer() -> None:
    err = from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "conn refused"), peer="w1")
    assert "w1" in err.message and err.code is errors.ErrorCode.UNAVAILABLE


def _details(err: errors.MeshError) -> dict[str, object]:
    """The unpacked details of err's google.rpc.Status, by type name."""
    from google.rpc import error_details_pb2

    st = to_rpc_status(err)
    out: dict[str, object] = {}
    for d in st.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
            error_details_pb2.BadRequest,
        ):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out[cls.__name__] = msg
    return out


def test_invalid_argument_carries_error_info_and_field_violations() -> None:
    err = errors.InvalidArgument("top_p must be in (0, 1]", field="sampling.top_p")
    d = _details(err)
    info = d["ErrorInfo"]
    assert (info.reason, info.domain) == ("INVALID_REQUEST", "meshserve")  # type: ignore[attr-defined]
    bad = d["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [  # type: ignore[attr-defined]
        ("sampling.top_p", "top_p must be in (0, 1]")
    ]
    assert "RetryInfo" not in d


@pytest.mark.parametrize(
    ("err", "delay_s"),
    [
        (errors.ResourceExhausted("full"), 0.5),
        (errors.Unavailable("down"), 1.0),
        (errors.Unavailable("loading", retry_after_s=5.0), 5.0),
    ],
)
def test_retryable_codes_carry_a_retry_delay(err: errors.MeshError, delay_s: float) -> None:
    retry = _details(err)["RetryInfo"]
    assert retry.retry_delay.ToNanoseconds() == int(delay_s * 1e9)  # type: ignore[attr-defined]


def test_a_downstream_peers_details_pass_through_unchanged() -> None:
    worker_err = errors.ResourceExhausted(
        "model at its limit", reason="MODEL_AT_CAPACITY", metadata={"model": "m"}
    )
    worker_status = to_rpc_status(worker_err)
    trailers = (("grpc-status-details-bin", worker_status.SerializeToString()),)
    rpc = _FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "model at its limit", trailers)
    back = from_rpc_error(rpc, peer="w1")
    assert back.reason == "MODEL_AT_CAPACITY"
    assert back.message == "model at its limit"  # a status with details keeps its message
    assert list(to_rpc_status(back).details) == list(worker_status.details)


def test_one_classification_of_errors() -> None:
    c = errors.classify
    assert c(errors.ErrorCode.INVALID_ARGUMENT) == errors.ErrorClass.CLIENT
    # A worker's NOT_FOUND means our view was stale: another worker may have the model,
    # and neither the request nor the worker's health is to blame.
    nf = errors.NotFound("x")
    assert nf.retryable and nf.is_client_error and not nf.worker_fault
    un = errors.Unavailable("x")
    assert un.retryable and un.worker_fault and not un.is_client_error
    re = errors.ResourceExhausted("x")
    assert re.retryable and not re.worker_fault and not re.is_client_error
    internal = errors.Internal("x")
    assert internal.worker_fault and not internal.retryable
    assert all(code in errors.CLASSIFICATION for code in errors.ErrorCode)
