"""Server wiring shared by the gateway and the worker: options, health, reflection."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from meshserve.v1 import inference_pb2, load_pb2

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
LOAD_SERVICE = load_pb2.DESCRIPTOR.services_by_name["LoadReporting"].full_name

# Caps that blunt abusive clients (HTTP/2 rapid reset, huge metadata) and keep
# dead peers from holding streams open.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_concurrent_streams", 1024),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class _GenericOnly:
    """Stands in for a server in generated `add_*Servicer_to_server` functions and
    passes on only their generic handler, not their "registered methods".

    Why: grpc.aio's accept loop keeps one pending request per registered method (plus
    one for all generic ones) and, for every incoming call, `asyncio.wait`s on all of
    them. Health (3 methods) and reflection (1) made that 5 futures instead of 1: about
    5 us more CPU per call, on every Inference call, for services called once a minute.
    As generic handlers they are found by one dict lookup each, after Inference's."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: object) -> None:
        pass  # the generic handler added alongside serves the same methods


def new_server(
    handlers: Sequence[grpc.GenericRpcHandler] = (),
    extra_services: Sequence[str] = (),
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with health checking and reflection already added
    (reflection lists Inference, health, itself and `extra_services`)."""
    server = grpc.aio.server(handlers=list(handlers), options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, _GenericOnly(server))
    names = (
        INFERENCE_SERVICE,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        *extra_services,
    )
    # What reflection.enable_server_reflection does for an aio server, minus the
    # registered methods (see _GenericOnly).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(names), _GenericOnly(server)
    )
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    st = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await health_servicer.set("", st)
    await health_servicer.set(INFERENCE_SERVICE, st)


def bind(server: grpc.aio.Server, address: str) -> int:
    """Bind `host:port` (port 0 picks one); return the port, failing loudly."""
    port = int(server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"could not bind {address}: is the port in use?")
    return port
