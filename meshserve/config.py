"""Service configuration: defaults < environment (MESHSERVE_*) < command-line flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def default_models_dir() -> Path:
    env = os.environ.get("MESHSERVE_MODELS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "meshserve" / "models"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_WORKER_", extra="ignore")

    worker_id: str = ""
    listen: str = "127.0.0.1:0"
    # host:port the gateways dial; derived from `listen` when empty.
    advertise: str = ""
    device: str = "cpu"
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["tiny-llama", "minilm"])
    models_dir: Path = Field(default_factory=default_models_dir)
    etcd: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1:2379"])
    lease_ttl: int = Field(default=5, ge=2)
    capacity: int = Field(default=64, ge=1)
    drain_grace_s: float = Field(default=30.0, ge=0)
    torch_threads: int = Field(default=0, ge=0)
    labels: dict[str, str] = Field(default_factory=dict)
    # FakeBackend models (no weights; simulated timing, for scheduler measurements):
    # names served with the `fake` backend instead of the model repository, and
    # their options (see worker.backends.fake_options), e.g. {"slots": "4", "speed": "0.5"}.
    fake_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    fake_options: dict[str, str] = Field(default_factory=dict)
    # Prometheus /metrics on this port; None: off. 0 picks one.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = ""  # empty: the host of `listen`

    _csv_fake = field_validator("fake_models", mode="before")(_split_csv)
    _csv_models = field_validator("models", "etcd", mode="before")(_split_csv)

    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_GATEWAY_", extra="ignore")

    listen: str = "127.0.0.1:50051"
    etcd: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1:2379"])
    # Extra attempts on another worker when a call fails before its first response.
    retries: int = Field(default=1, ge=0, le=5)
    # Retries are at most this share of the calls over 10 s, plus a floor per second,
    # so retries cannot snowball under overload.
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    retry_budget_min_per_s: float = Field(default=5.0, ge=0)
    # A worker is routed around after this many timeouts in a row (or one UNAVAILABLE).
    eject_after_timeouts: int = Field(default=3, ge=1)
    eject_s: float = Field(default=5.0, gt=0)
    # The deadline a call without one gets: nothing waits on a worker forever.
    max_call_s: float = Field(default=900.0, gt=0)
    # A stream whose worker fails after its first message moves to another worker at
    # most this many times (0: never; a request can opt out with disable_migration).
    max_migrations: int = Field(default=3, ge=0, le=10)
    # Shutdown: NOT_SERVING at once but still accepting calls for `drain_accept_s`, so
    # readiness probes and load balancers move traffic away first; then no new calls,
    # and open ones get `drain_grace_s` to finish before the gateway ends them
    # (UNAVAILABLE, GATEWAY_DRAINING: retry on another gateway).
    drain_accept_s: float = Field(default=3.0, ge=0)
    drain_grace_s: float = Field(default=10.0, ge=0)
    # Routing policy (gateway.scheduler.POLICY_NAMES); latency_capacity by default.
    policy: str = "latency_capacity"
    # Session affinity keeps a session on its worker while that worker's load is
    # at most this factor times the average.
    affinity_load_factor: float = Field(default=1.25, ge=1.0)
    # Calls queued at this gateway while every worker is full, and how long at most.
    queue_max: int = Field(default=1024, ge=0)
    queue_max_wait_s: float = Field(default=30.0, ge=0)
    # A client connection is closed (GOAWAY) after this long, so clients behind a load
    # balancer spread over gateways that joined later; open calls get the grace.
    max_connection_age_s: float = Field(default=300.0, gt=0)
    max_connection_age_grace_s: float = Field(default=600.0, ge=0)
    # Prometheus /metrics (and the fleet page) on this port; None: off. 0 picks one.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Where the metrics port listens; empty: the host of `listen`.
    metrics_host: str = ""

    _csv_etcd = field_validator("etcd", mode="before")(_split_csv)


def advertise_address(listen: str, port: int) -> str:
    """The address peers should dial for a server bound to `listen` on `port`."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"
