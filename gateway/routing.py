"""What the router declares and receives: the fleet view and stream watch it reads,
the policies it ranks with, the explanations it gives (gateway.router is the mechanism)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.scheduler.explain import Explanation
from gateway.scheduler.types import Policy
from meshserve.errors import InvalidArgument, MeshError, NotFound, Reason, Unavailable
from meshserve.vocab import WorkerState
from registry.aliases import AliasRecord
from registry.records import WorkerRecord


class FleetView(Protocol):
    """The registry as the router reads it (registry.view.RegistryView in production)."""

    @property
    def workers(self) -> Mapping[str, WorkerRecord]: ...

    @property
    def aliases(self) -> Mapping[str, AliasRecord]: ...

    def ready_for(self, model: str) -> list[WorkerRecord]: ...

    def models(self) -> set[str]: ...

    def add_listener(self, cb: Callable[[], None]) -> None: ...


class StreamWatch(Protocol):
    """Told when this gateway's streams on a worker start and end (load during streams)."""

    def stream_started(self, worker_id: str, address: str) -> None: ...

    def stream_ended(self, worker_id: str) -> None: ...


class NoWatch:
    def stream_started(self, worker_id: str, address: str) -> None:
        pass

    def stream_ended(self, worker_id: str) -> None:
        pass


class Policies:
    """The gateway's policy and the ones callers may ask for by name (built on first use)."""

    def __init__(self, default: Policy, factory: Callable[[str], Policy] | None = None) -> None:
        self.default = default
        self._factory = factory
        self._built: dict[str, Policy] = {}

    def get(self, name: str) -> Policy:
        if not name or self._factory is None:
            return self.default
        policy = self._built.get(name)
        if policy is None:
            try:
                policy = self._factory(name)
            except (KeyError, ValueError) as exc:
                raise InvalidArgument(
                    f"unknown routing policy {name!r}: {exc}",
                    reason=Reason.UNKNOWN_POLICY,
                    field="metadata.x-meshserve-policy",
                ) from None
            self._built[name] = policy
        return policy


@dataclass(frozen=True)
class RouteExplanation:
    model: str  # after alias resolution
    policy: str
    candidates: list[Explanation]  # in the policy's order
    ejected: frozenset[str]  # answered UNAVAILABLE lately: a last resort only
    too_short: frozenset[str]  # their sequence length cannot hold the request


def no_worker_error(view: FleetView, model: str, tried: bool) -> MeshError:
    """NotFound when no worker lists the model, else Unavailable naming each replica's state."""
    workers = view.workers
    if not any(w.model(model) for w in workers.values()):
        known = ", ".join(sorted(view.models())) or "none"
        return NotFound(
            f"model {model!r} is not served by any worker (models: {known})",
            metadata={"model": model},
            field="model",
        )
    states = sorted(
        f"{w.worker_id}={m.state.value}" + ("/draining" if w.state is WorkerState.DRAINING else "")
        for w in workers.values()
        if (m := w.model(model)) is not None
    )
    why = "all tried" if tried else "none ready"
    return Unavailable(
        f"no worker can serve {model!r} now ({why}: {', '.join(states)})",
        reason=Reason.NO_READY_WORKER,
        metadata={"model": model},
    )
