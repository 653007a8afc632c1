"""Server and channel wiring shared by the gateway, the worker and the clients: options,
health, reflection, credentials (in one place)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


# After a drain's grace: how long calls ended by the server's own `at_grace` have to
# send their status before grpc cancels them.
END_S = 1.0


def model_service(model: str) -> str:
    """The health service name of one model (`meshserve.v1.Inference/<model>`): a
    readiness probe or a client can ask about one model."""
    return f"{INFERENCE_SERVICE}/{model}"


@dataclass
class Server:
    """A started-or-not grpc.aio server with health and reflection, bound to a port."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    # Every service registered (Inference, health, reflection, ...): each has a health
    # entry, plus the overall "" entry.
    services: tuple[str, ...]

    async def start(self) -> None:
        await self.server.start()

    def add_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(list(handlers))

    async def set_serving(self, serving: bool, services: Sequence[str] | None = None) -> None:
        """Health of `services` (default: all of them and the overall "")."""
        st = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services) if services is None else services:
            await self.health.set(name, st)

    async def stop(
        self,
        grace_s: float | None,
        *,
        accept_s: float = 0.0,
        at_grace: Callable[[], object] | None = None,
    ) -> None:
        """NOT_SERVING everywhere first (so probes and clients move away), still accepting
        calls for `accept_s` (a load balancer takes that long to notice), then stop
        accepting calls and let the open ones finish within `grace_s`. `at_grace` ends
        those still open then, each with a status of its own: grpc cancels what is left
        (`Cancelling all calls`) only END_S later."""
        await self.health.enter_graceful_shutdown()
        if accept_s > 0:
            await asyncio.sleep(accept_s)  # a period, not a wait for anything
        if grace_s is None or at_grace is None:
            await self.server.stop(grace_s)
            return
        # grpc's stop returns as soon as the last call is done, however early.
        stopping = asyncio.ensure_future(self.server.stop(grace_s + END_S))
        done, _ = await asyncio.wait({stopping}, timeout=grace_s)
        if not done:
            at_grace()
        await stopping


def new_server(
    listen: str,
    *,
    handlers: Sequence[grpc.GenericRpcHandler] = (),
    services: Sequence[str] = (INFERENCE_SERVICE,),
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    options: Sequence[tuple[str, int]] = (),
) -> Server:
    """A grpc.aio server bound to `listen` (port 0 picks one; failing loudly), with
    health checking and reflection already added; reflection lists `services`, health
    and itself. `options` add to (and override) SERVER_OPTIONS."""
    server = grpc.aio.server(
        handlers=list(handlers),
        interceptors=list(interceptors) or None,
        options=[*SERVER_OPTIONS, *options],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, _GenericOnly(server))
    names = (
        *services,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    # What reflection.enable_server_reflection does for an aio server, minus the
    # registered methods (see _GenericOnly).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(names), _GenericOnly(server)
    )
    if credentials is None:
        port = int(server.add_insecure_port(listen))
    else:
        port = int(server.add_secure_port(listen, credentials))
    if port == 0:
        raise OSError(f"could not bind {listen}: is the port in use?")
    return Server(server, health_servicer, port, names)


def new_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, int | str]] = (),
) -> grpc.aio.Channel:
    """The one way meshserve opens a channel (forwarder, load watch, clients): the
    shared options, and credentials when given."""
    opts = [*CHANNEL_OPTIONS, *options]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)
