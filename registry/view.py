"""RegistryView: the gateway's in-memory, always-available copy of the registry.

list -> watch from revision+1 -> apply events, in one background task that
never dies. A cheap periodic ping tells "etcd down" apart from "nothing
happened" (etcd3aio's watch hides reconnects); on any failure the view keeps
its last snapshot, reports `connected=False`, backs off and re-lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Self

from registry.aliases import AliasRecord
from registry.etcd import EtcdRegistry, WatchCompacted
from registry.events import AliasEvent, RegistryEvent
from registry.records import WorkerRecord

log = logging.getLogger(__name__)

_MAX_BACKOFF = 2.0  # list attempts are cheap; the gateway wants fresh data soon


class RegistryView:
    def __init__(
        self,
        registry: EtcdRegistry,
        *,
        resync_backoff: float = 0.5,
        probe_interval: float = 1.0,
    ) -> None:
        self._registry = registry
        self._resync_backoff = resync_backoff
        self._probe_interval = probe_interval
        # Copy-on-write: each change builds a new dict, so a Mapping handed out
        # by `workers` is a consistent snapshot that never changes under a reader.
        self._workers: dict[str, WorkerRecord] = {}
        self._aliases: dict[str, AliasRecord] = {}
        self._revision = 0
        self._connected = False
        self._last_error = ""
        self._cond = asyncio.Condition()
        self._started = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._state_listeners: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._listed = False  # the current session's list succeeded
        self._last_contact = 0.0  # time.monotonic() of etcd's last answer (0: never)

    # -- read side ----------------------------------------------------------

    @property
    def workers(self) -> Mapping[str, WorkerRecord]:
        return MappingProxyType(self._workers)

    @property
    def aliases(self) -> Mapping[str, AliasRecord]:
        return MappingProxyType(self._aliases)

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def ever_connected(self) -> bool:
        """Whether a first list of the registry ever succeeded."""
        return self._started.is_set()

    def staleness_s(self) -> float | None:
        """Seconds since etcd last answered (None: never); 0-ish while connected."""
        if not self._last_contact:
            return None
        return time.monotonic() - self._last_contact

    def ready_for(self, model: str) -> list[WorkerRecord]:
        return [w for w in self._workers.values() if w.serves(model)]

    def models(self) -> set[str]:
        """Every model name some worker lists, in any state."""
        return {m.name for w in self._workers.values() for m in w.models}

    def add_listener(self, cb: Callable[[], None]) -> None:
        """`cb()` runs (synchronously, in the view's task) after each applied change."""
        self._listeners.append(cb)

    def add_state_listener(self, cb: Callable[[], None]) -> None:
        """`cb()` runs after each change of the snapshot or of the connection state."""
        self._state_listeners.append(cb)

    async def wait_for(
        self,
        predicate: Callable[[Mapping[str, WorkerRecord]], bool],
        timeout: float,
    ) -> None:
        """Until predicate(workers) holds; re-checked on every change, including
        connection-state changes. Raises TimeoutError."""
        async with asyncio.timeout(timeout), self._cond:
            await self._cond.wait_for(lambda: predicate(self.workers))

    async def wait_started(self) -> None:
        """Until the first list succeeded (may wait forever while etcd is down)."""
        await self._started.wait()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-view")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- background task ----------------------------------------------------

    async def _run(self) -> None:
        backoff = self._resync_backoff
        while True:
            self._listed = False
            try:
                await self._session()
            except Exception as exc:  # incl. TaskGroup's ExceptionGroup: the task must not die
                compacted = _compaction_in(exc)
                if compacted is not None and compacted.compact_revision > 0:
                    # etcd is fine, only our watch position is gone: re-list at once.
                    log.info("registry watch: %s; re-listing", compacted)
                    continue
                error = _describe(exc)
                # Once per outage (last_error is "" while connected and before the first try).
                level = (
                    logging.WARNING if self._connected or not self._last_error else logging.DEBUG
                )
                log.log(level, "registry view disconnected: %s (keeping the last snapshot)", error)
                await self._set_connected(False, error)
            if self._listed:  # this outage is new: retry quickly first
                backoff = self._resync_backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max(_MAX_BACKOFF, self._resync_backoff))

    async def _session(self) -> None:
        workers, alias_map, revision = await self._registry.list_registry()
        self._last_contact = time.monotonic()
        await self._replace(workers, alias_map, revision)
        if not self._connected:
            log.info("registry view connected: %d workers at revision %d", len(workers), revision)
        await self._set_connected(True)
        self._listed = True
        self._started.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._consume(revision + 1))
            tg.create_task(self._probe())

    async def _consume(self, start_revision: int) -> None:
        async for batch in self._registry.watch_registry(start_revision):
            await self._apply(batch)
        raise RuntimeError("registry watch ended unexpectedly")

    async def _probe(self) -> None:
        """Fails (and so ends the session) when etcd stops answering."""
        while True:
            await asyncio.sleep(self._probe_interval)
            await self._registry.ping()
            self._last_contact = time.monotonic()

    # -- state changes ------------------------------------------------------

    async def _replace(
        self, workers: dict[str, WorkerRecord], alias_map: dict[str, AliasRecord], revision: int
    ) -> None:
        changed = workers != self._workers or alias_map != self._aliases
        self._workers, self._aliases = dict(workers), dict(alias_map)
        self._revision = revision
        await self._changed(snapshot=changed)

    async def _apply(self, batch: list[RegistryEvent]) -> None:
        self._last_contact = time.monotonic()
        new = dict(self._workers)
        new_aliases = self._aliases
        for ev in batch:
            if isinstance(ev, AliasEvent):
                new_aliases = dict(new_aliases) if new_aliases is self._aliases else new_aliases
                if ev.alias is not None:
                    new_aliases[ev.name] = ev.alias
                else:
                    new_aliases.pop(ev.name, None)
            elif ev.kind == "put" and ev.record is not None:
                new[ev.worker_id] = ev.record
            else:
                new.pop(ev.worker_id, None)
        self._workers, self._aliases = new, new_aliases
        self._revision = max(self._revision, *(ev.revision for ev in batch))
        await self._changed(snapshot=True)

    async def _set_connected(self, connected: bool, error: str = "") -> None:
        if (connected, error) != (self._connected, self._last_error):
            self._connected, self._last_error = connected, error
            await self._changed(snapshot=False)

    async def _changed(self, *, snapshot: bool) -> None:
        async with self._cond:
            self._cond.notify_all()
        for cb in list(self._state_listeners):
            try:
                cb()
            except Exception:
                log.exception("registry view state listener %r failed", cb)
        if not snapshot:
            return
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:
                log.exception("registry view listener %r failed", cb)


def _compaction_in(exc: BaseException) -> WatchCompacted | None:
    if isinstance(exc, WatchCompacted):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _compaction_in(sub)
            if found is not None:
                return found
    return None


def _describe(exc: BaseException) -> str:
    """One line for last_error/logs; unwraps TaskGroup's ExceptionGroup."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return "; ".join(_describe(e) for e in exc.exceptions)
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
