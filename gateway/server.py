"""Gateway process wiring: registry view, router, gRPC server, health, shutdown."""

from __future__ import annotations

import asyncio
import logging

from gateway.admin import ADMIN_SERVICE, AdminServicer
from gateway.admission import AdmissionQueue
from gateway.fleet import top_scores
from gateway.fleet_page import fleet_pages
from gateway.forwarder import Forwarder
from gateway.health import GatewayHealth
from gateway.loadwatch import LoadWatcher
from gateway.metrics import GatewayMetrics
from gateway.observe import RouterObserver, combine
from gateway.retry_budget import RetryBudget
from gateway.router import Router
from gateway.routing import Policies
from gateway.scheduler.affinity import with_affinity
from gateway.scheduler.policies import build_policy
from gateway.scheduler.types import Policy
from gateway.servicer import GatewayServicer
from gateway.tracing import RouterTracer
from meshserve.config import GatewaySettings
from meshserve.edge import Edge, EdgeHook
from meshserve.errors import Reason, Unavailable
from meshserve.grpc_server import INFERENCE_SERVICE, Server, new_server
from meshserve.httpd import MetricsServer
from meshserve.metrics import process_registry
from meshserve.process import freeze_startup_heap, serve_until_signal
from meshserve.tracing import Tracing
from registry.etcd import EtcdRegistry
from registry.metrics import RegistryMetrics
from registry.observe import NO_REGISTRY_OBSERVER
from registry.view import RegistryView

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        metrics_on = settings.metrics_port is not None
        prom = process_registry() if metrics_on else None
        self.registry = EtcdRegistry(
            settings.etcd,
            observer=RegistryMetrics(prom) if prom is not None else NO_REGISTRY_OBSERVER,
        )
        self.view = RegistryView(self.registry)
        self.forwarder = Forwarder()

        def make_policy(name: str) -> Policy:
            return with_affinity(build_policy(name), c=settings.affinity_load_factor)

        self.router: Router
        # Load during streams comes back to the router (it reads the channel of the
        # forwarder): built before the router, which it reports to.
        self.loadwatch = LoadWatcher(
            self.forwarder.channel, lambda wid, rep: self.router.on_streamed_report(wid, rep)
        )
        admission = AdmissionQueue(
            max_waiting=settings.queue_max, max_wait_s=settings.queue_max_wait_s
        )
        # Metrics only when asked for (--metrics-port): off, the hooks are not there at all.
        self.metrics = (
            GatewayMetrics(self.view, admission, registry=prom) if prom is not None else None
        )
        observers: list[RouterObserver] = []
        hooks: list[EdgeHook] = []
        if self.metrics is not None:
            observers.append(self.metrics)
            hooks.append(self.metrics)
        # Traces only when an OTLP endpoint is configured (MESHSERVE_OTLP_ENDPOINT).
        self.tracing = Tracing.from_env("meshserve-gateway")
        if self.tracing is not None:
            observers.append(
                RouterTracer(
                    self.tracing, settings.policy, lambda facts: top_scores(self.router, facts)
                )
            )
            hooks.append(self.tracing)
        self.router = Router(
            fleet=self.view,
            transport=self.forwarder,
            # Callers may pick another policy per request (metadata x-meshserve-policy).
            policies=Policies(make_policy(settings.policy), make_policy),
            admission=admission,
            watch=self.loadwatch,
            observer=combine(observers),
            retries=settings.retries,
            budget=RetryBudget(
                ratio=settings.retry_budget_ratio, min_per_s=settings.retry_budget_min_per_s
            ),
            eject_s=settings.eject_s,
            max_timeouts=settings.eject_after_timeouts,
            max_call_s=settings.max_call_s,
            max_migrations=settings.max_migrations,
        )
        self.edge = Edge(hooks=hooks)
        self.port = 0
        self.metrics_port = 0
        self._server: Server | None = None
        self._http: MetricsServer | None = None
        self.health: GatewayHealth | None = None

    def _on_view_change(self) -> None:
        self.forwarder.retain(set(self.view.workers))

    async def start(self) -> None:
        await self.registry.connect()
        self.view.add_listener(self._on_view_change)
        await self.view.start()
        servicer = GatewayServicer(self.router, self.view)
        s = self.settings
        server = new_server(
            s.listen,
            handlers=[servicer.handler(self.edge)],
            services=(INFERENCE_SERVICE, ADMIN_SERVICE),
            # Clients behind a Kubernetes Service reconnect now and then, so they spread
            # over new gateway pods; open streams get the grace to finish.
            options=[
                ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
            ],
        )
        self.port = server.port
        self.health = GatewayHealth(self.view, server)
        admin = AdminServicer(self.router, self.view, self.health, s.policy)
        server.add_handlers([admin.handler(self.edge)])
        await server.start()
        # Health, reflection, admin: serving now. Inference: as the registry view says.
        await server.set_serving(True, [n for n in server.services if n != INFERENCE_SERVICE])
        await self.health.start()
        self._server = server
        if self.metrics is not None:
            pages = fleet_pages(asyncio.get_running_loop(), self.view, self.router, self.health)
            self._http = MetricsServer(
                self.metrics.registry,
                host=self.settings.metrics_host or self.settings.listen.rsplit(":", 1)[0],
                port=self.settings.metrics_port or 0,
                pages=pages,
            )
            self._http.start()
            self.metrics_port = self._http.port
            log.info("gateway metrics on port %d", self.metrics_port)
        freeze_startup_heap()
        log.info("gateway listening on %s", self.address)

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        """Drain: NOT_SERVING (overall and per model) while still accepting calls for
        `drain_accept_s`, then no new calls; open ones get `drain_grace_s`, and those
        still open then end with UNAVAILABLE / GATEWAY_DRAINING (retry elsewhere)."""
        if self.health is not None:
            await self.health.stop()  # the server's stop sets everything NOT_SERVING
        if self._server is not None:
            s = self.settings
            await self._server.stop(
                s.drain_grace_s, accept_s=s.drain_accept_s, at_grace=self._end_open_calls
            )
            self._server = None
        if self._http is not None:  # after the drain: metrics show it to the end
            self._http.stop()
            self._http = None
        await self.view.stop()
        await self.loadwatch.close()
        await self.forwarder.close()
        await self.registry.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports what is buffered

    def _end_open_calls(self) -> None:
        err = Unavailable(
            "gateway shutting down: the call outlasted its drain grace period; "
            "retry on another gateway",
            reason=Reason.GATEWAY_DRAINING,
            metadata={"gateway": self.address},
        )
        n = self.edge.end_open_calls(err)
        if n:
            log.warning(
                "drain grace (%.1fs) over: ended %d open calls", self.settings.drain_grace_s, n
            )

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then drain and stop."""
        await serve_until_signal(self.start, self.stop)
