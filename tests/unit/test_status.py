"""The one table between MeshError codes and gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from meshserve import errors
from meshserve.status import as_mesh_error, from_rpc_error, to_grpc_code


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

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
