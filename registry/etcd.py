"""EtcdRegistry: lease-bound worker records in etcd (the only etcd3aio user).

Workers `register()` once, `update()` on change and `deregister()` on exit; a
background task keeps the lease alive and re-creates it if etcd lost it.
Gateways `list_workers()` then `watch_workers()` from the next revision (see
registry.view). Every etcd failure surfaces as `RegistryUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import etcd3aio
import grpc
import grpc.aio
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub

from meshserve.errors import RegistryUnavailable
from registry import aliases, keys, records
from registry.aliases import AliasRecord
from registry.events import (
    ALIASES,
    RegistryEvent,
    WorkerEvent,
    decode_alias,
    decode_worker,
    event,
)
from registry.observe import (
    DELETE,
    LEASE_GRANT,
    LEASE_KEEPALIVE,
    LEASE_REVOKE,
    LIST,
    NO_REGISTRY_OBSERVER,
    PUT,
    RegistryObserver,
)
from registry.records import WorkerRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

# Transient failures are retried inside op_timeout; anything else fails at once.
_TRANSIENT = (etcd3aio.EtcdConnectionError, etcd3aio.EtcdTransientError, TimeoutError)
_ETCD_ERRORS = (etcd3aio.EtcdError, grpc.aio.AioRpcError, TimeoutError)
# gRPC's default reconnect backoff grows to 120 s: after a long etcd outage the
# channel would sit idle long after etcd is back. Cap it so recovery is ~1 s.
_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class WatchCompacted(Exception):
    """The watch cannot resume: history it needs was compacted (or etcd canceled it)."""

    def __init__(self, compact_revision: int, reason: str = "") -> None:
        super().__init__(
            f"watch canceled by etcd (compact_revision={compact_revision}"
            + (f", reason={reason!r})" if reason else ")")
        )
        self.compact_revision = compact_revision


class EtcdRegistry:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ttl: int = 5,
        op_timeout: float = 3.0,
        observer: RegistryObserver = NO_REGISTRY_OBSERVER,
        channel_options: Sequence[tuple[str, int]] = (),
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        if ttl < 1:
            raise ValueError("ttl must be >= 1 second")
        self.endpoints = tuple(endpoints)
        self.ttl = ttl
        self.op_timeout = op_timeout
        self._observer = observer
        self._channel_options = [*_CHANNEL_OPTIONS, *channel_options]
        self._client: Any = None  # etcd3aio.Etcd3Client (untyped library)
        # Worker-side state.
        self._record: WorkerRecord | None = None
        self._written: bytes | None = None  # value etcd holds under our lease
        self._written_revision = 0  # etcd revision of that put: later changes are not ours
        self._dirty = False  # _record not yet in etcd (a write failed)
        self._lease_id = 0
        self._granted_ttl = ttl
        self._renewed_at = 0.0  # loop time the last grant or successful renewal was sent
        self._keepalive_task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------

    async def connect(self) -> None:
        """Create the channel. Lazy: does not contact etcd (use ping() for that)."""
        if self._client is not None:
            return
        client = etcd3aio.Etcd3Client(list(self.endpoints))
        manager = getattr(client, "_manager", None)
        if manager is not None and isinstance(getattr(manager, "grpc_options", None), list):
            manager.grpc_options.extend(self._channel_options)
        await client.connect()
        self._client = client

    async def close(self) -> None:
        """Stop the keep-alive task and close the channel. Does not revoke the lease."""
        await self._stop_keepalive()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def endpoint_label(self) -> str:
        return ",".join(self.endpoints)

    async def ping(self, timeout_s: float | None = None) -> int:
        """One cheap linearizable read, no retries; returns etcd's current revision."""
        client = self._require_client()
        t = self.op_timeout if timeout_s is None else timeout_s
        try:
            resp = await client.kv.get(keys.ROOT, count_only=True, timeout=t, max_attempts=1)
        except _ETCD_ERRORS as exc:
            raise self._unavailable("ping", exc) from exc
        return int(resp.header.revision)

    # -- worker side --------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._record is not None

    @property
    def lease_id(self) -> int:
        return self._lease_id

    async def register(self, record: WorkerRecord) -> None:
        """Grant a lease, put the record on it, start the keep-alive task."""
        if self._record is not None:
            raise RuntimeError(f"already registered as {self._record.worker_id!r}")
        key = keys.worker_key(record.worker_id)  # validates the id before any I/O
        client = self._require_client()
        value = records.encode(record)
        async with self._write_lock:
            self._renewed_at = asyncio.get_running_loop().time()
            grant = await self._call(LEASE_GRANT, lambda t: client.lease.grant(self.ttl, **_o(t)))
            lease_id, self._granted_ttl = int(grant.ID), int(grant.TTL) or self.ttl
            try:
                put = await self._call(PUT, lambda t: client.kv.put(key, value, lease_id, **_o(t)))
            except RegistryUnavailable:
                with contextlib.suppress(*_ETCD_ERRORS):
                    await client.lease.revoke(lease_id, timeout=self.op_timeout)
                raise
            self._lease_id, self._record = lease_id, record
            self._written, self._dirty = value, False
            self._written_revision = int(put.header.revision)
        self._keepalive_task = asyncio.create_task(
            self._keepalive_loop(), name=f"etcd-keepalive-{record.worker_id}"
        )
        log.info("registered worker %s (lease %x, ttl %ds)", record.worker_id, lease_id, self.ttl)

    async def update(self, record: WorkerRecord) -> bool:
        """Re-put the record under the current lease if (and only if) it changed.

        Returns True when a write happened. On RegistryUnavailable the record is
        remembered and the keep-alive task writes it once etcd is back.
        """
        if self._record is None:
            raise RuntimeError("update() before register()")
        if record.worker_id != self._record.worker_id:
            raise ValueError(
                f"worker id changed from {self._record.worker_id!r} to {record.worker_id!r}"
            )
        self._record = record
        async with self._write_lock:
            if records.encode(record) == self._written:
                self._dirty = False
                return False
            self._dirty = True
            await self._put_current()
            return True

    @property
    def written_revision(self) -> int:
        """The etcd revision of this worker's last write of its record (0: none)."""
        return self._written_revision

    async def restore(self, changed_at: int, before_put: Callable[[], None] = lambda: None) -> bool:
        """Our key changed at revision `changed_at` (a watch saw it): put the record
        back unless we wrote it since (`before_put()` first). True when it put it;
        raises like update()."""
        async with self._write_lock:  # our writes run under it: none is half-done here
            if self._record is None or changed_at <= self._written_revision:
                return False
            before_put()
            self._dirty = True  # if this put fails, the keep-alive retries it
            await self._put_current()
            return True

    async def deregister(self) -> None:
        """Stop the keep-alive and revoke the lease (the key goes at once). Never raises."""
        await self._stop_keepalive()
        lease_id, record = self._lease_id, self._record
        self._record, self._written, self._dirty, self._lease_id = None, None, False, 0
        self._written_revision = 0
        if not lease_id or self._client is None:
            return
        client = self._client
        try:
            await self._call(LEASE_REVOKE, lambda t: client.lease.revoke(lease_id, **_o(t)))
        except RegistryUnavailable as exc:
            if not _is_not_found(exc.__cause__):
                log.warning(
                    "deregister %s: %s; its record expires with the lease in <= %ds",
                    record.worker_id if record else "?",
                    exc.message,
                    self._granted_ttl,
                )
            return
        log.info("deregistered worker %s", record.worker_id if record else "?")

    async def _put_current(self, *, regrant_if_lost: bool = True) -> None:
        """Write self._record under self._lease_id. Caller holds _write_lock."""
        assert self._record is not None
        client = self._require_client()
        key, value, lease_id = (
            keys.worker_key(self._record.worker_id),
            records.encode(self._record),
            self._lease_id,
        )
        try:
            put = await self._call(PUT, lambda t: client.kv.put(key, value, lease_id, **_o(t)))
        except RegistryUnavailable as exc:
            # The lease expired before the keep-alive noticed: don't wait for it.
            if regrant_if_lost and _is_not_found(exc.__cause__):
                await self._regrant()
                return
            raise
        self._written, self._dirty = value, False
        self._written_revision = int(put.header.revision)

    async def _keepalive_loop(self) -> None:
        """Own keep-alive: survives outages and re-creates a lost lease. Never exits.

        A renewal is due a third of the TTL after the last grant or renewal was sent,
        not after that call returned: when etcd is slow, grant + put can take most of
        the TTL, and a whole interval on top let the lease expire before its first
        renewal, and again after every re-grant (the worker flapped until etcd sped up).
        """
        loop = asyncio.get_running_loop()
        outage = False
        delay = self._renewal_delay(loop)
        while True:
            await asyncio.sleep(delay)
            delay = max(self._granted_ttl / 3, 0.2)  # after a failure: a whole interval
            sent = loop.time()
            try:
                lease_id = self._lease_id
                remaining = await self._keepalive_once(lease_id)
                async with self._write_lock:
                    if remaining <= 0:
                        if lease_id == self._lease_id:  # no write re-granted it meanwhile
                            await self._regrant()
                    else:
                        self._renewed_at = sent
                        if self._dirty:
                            await self._put_current()
                delay = self._renewal_delay(loop)
                if outage:
                    log.info("etcd at %s reachable again", self.endpoint_label)
                outage = False
            except RegistryUnavailable as exc:
                if not outage:
                    log.warning("keep-alive: %s (retrying until it is back)", exc.message)
                outage = True
            except Exception:  # a bug here must not unregister the worker
                log.exception("keep-alive: unexpected error (retrying)")

    def _renewal_delay(self, loop: asyncio.AbstractEventLoop) -> float:
        return max(self._renewed_at + max(self._granted_ttl / 3, 0.2) - loop.time(), 0.0)

    async def _keepalive_once(self, lease_id: int) -> int:
        """Send one LeaseKeepAlive on a fresh stream; return the TTL etcd reports."""
        started = time.perf_counter()
        try:
            ttl = await self._keepalive_call(lease_id)
        except RegistryUnavailable:
            self._observer.on_call(LEASE_KEEPALIVE, time.perf_counter() - started, False)
            raise
        seconds = time.perf_counter() - started
        self._observer.on_call(LEASE_KEEPALIVE, seconds, True)
        self._observer.on_keepalive(lease_id, ttl, seconds)
        return ttl

    async def _keepalive_call(self, lease_id: int) -> int:
        call = self._require_client().lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(self.op_timeout):
                resp = await call.read()
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            raise self._unavailable(LEASE_KEEPALIVE, exc) from exc
        finally:
            call.cancel()
        if resp is grpc.aio.EOF:  # missing from grpc-stubs
            raise RegistryUnavailable(f"etcd at {self.endpoint_label}: keep-alive stream ended")
        return int(resp.TTL)

    async def _regrant(self) -> None:
        """The lease expired (etcd unreachable too long, or revoked): start over."""
        assert self._record is not None
        client = self._require_client()
        log.warning(
            "lease %x of %s was lost; granting a new one", self._lease_id, self._record.worker_id
        )
        self._renewed_at = asyncio.get_running_loop().time()
        grant = await self._call(LEASE_GRANT, lambda t: client.lease.grant(self.ttl, **_o(t)))
        self._lease_id, self._granted_ttl = int(grant.ID), int(grant.TTL) or self.ttl
        self._dirty = True  # the old key went with the old lease
        await self._put_current(regrant_if_lost=False)

    async def _stop_keepalive(self) -> None:
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- gateway side -------------------------------------------------------

    async def list_workers(self) -> tuple[dict[str, WorkerRecord], int]:
        """All decodable worker records and the revision they were read at."""
        workers, _, revision = await self.list_registry()
        return workers, revision

    async def list_registry(self) -> tuple[dict[str, WorkerRecord], dict[str, AliasRecord], int]:
        """Workers and model aliases in one read, and the revision it was made at."""
        client = self._require_client()
        prefix = keys.ROOT
        end = etcd3aio.prefix_range_end(prefix)
        resp = await self._call(LIST, lambda t: client.kv.get(prefix, end, **_o(t)))
        workers: dict[str, WorkerRecord] = {}
        alias_map: dict[str, AliasRecord] = {}
        for kv in resp.kvs:
            key = bytes(kv.key)
            if key.startswith(ALIASES):
                alias = decode_alias(key, bytes(kv.value))
                if alias is not None:
                    alias_map[alias.name] = alias
            elif (rec := decode_worker(key, bytes(kv.value))) is not None:
                workers[rec.worker_id] = rec
        return workers, alias_map, int(resp.header.revision)

    async def watch_workers(self, start_revision: int) -> AsyncIterator[list[WorkerEvent]]:
        """Worker events only (see watch_registry)."""
        async for batch in self.watch_registry(start_revision):
            workers = [ev for ev in batch if isinstance(ev, WorkerEvent)]
            if workers:
                yield workers

    async def watch_registry(
        self, start_revision: int, *, key: str = ""
    ) -> AsyncIterator[list[RegistryEvent]]:
        """Worker and alias events from `start_revision`, one list per etcd response;
        with `key`, that key's only (a worker guarding its own record).

        A lost stream raises RegistryUnavailable (callers re-list and resume); a
        PUT with an undecodable value is reported as a delete: a record we cannot
        read must not be routed to.
        """
        client = self._require_client()
        prefix = (key or keys.ROOT).encode()
        range_end = b"" if key else etcd3aio.prefix_range_end(prefix)
        # Our own stream on etcd3aio's channel and generated stub: its watch()
        # parks the request iterator on a never-ending future, leaking a task per
        # failed stream. Here the iterator ends when we leave.
        stub = WatchStub(client._channel)
        done = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield WatchRequest(
                create_request=WatchCreateRequest(
                    key=prefix,
                    range_end=range_end,
                    start_revision=start_revision,
                )
            )
            await done.wait()

        call = stub.Watch(requests())
        try:
            async for resp in call:
                if resp.compact_revision > 0 or resp.canceled:
                    raise WatchCompacted(int(resp.compact_revision), str(resp.cancel_reason))
                batch = [ev for ev in map(event, resp.events) if ev is not None]
                if batch:
                    yield batch
            raise RegistryUnavailable(f"etcd at {self.endpoint_label} ended the watch stream")
        except _ETCD_ERRORS as exc:
            raise self._unavailable("Watch", exc) from exc
        finally:
            done.set()
            call.cancel()

    async def put_alias(self, alias: AliasRecord) -> None:
        """Create or replace a model alias (not lease-bound: it outlives any process)."""
        client = self._require_client()
        key, value = keys.alias_key(alias.name), aliases.encode(alias)
        await self._call(PUT, lambda t: client.kv.put(key, value, **_o(t)))

    async def delete_alias(self, name: str) -> bool:
        """Remove an alias; False when there was none."""
        client = self._require_client()
        key = keys.alias_key(name)
        resp = await self._call(DELETE, lambda t: client.kv.delete(key, **_o(t)))
        return int(resp.deleted) > 0

    # -- helpers ------------------------------------------------------------

    def _require_client(self) -> Any:
        if self._client is None:
            raise RuntimeError("EtcdRegistry is not connected: call connect() first")
        return self._client

    def _unavailable(self, op: str, exc: BaseException) -> RegistryUnavailable:
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {self.op_timeout:g}s"
        elif isinstance(exc, grpc.aio.AioRpcError):  # its str() spans lines
            detail = f"{exc.code().name}: {exc.details()}"
        else:
            detail = str(exc) or type(exc).__name__
        return RegistryUnavailable(f"etcd at {self.endpoint_label} unavailable ({op}): {detail}")

    async def _call(self, op: str, fn: Callable[[float], Awaitable[T]]) -> T:
        """`_retry`, timed for the observer (perf_counter: the loop's clock may tick in ms)."""
        started, ok = time.perf_counter(), False
        try:
            result = await self._retry(op, fn)
            ok = True
            return result
        finally:
            self._observer.on_call(op, time.perf_counter() - started, ok)

    async def _retry(self, op: str, fn: Callable[[float], Awaitable[T]]) -> T:
        """Run one etcd3aio call (given its per-try timeout), retrying transient
        errors with backoff until op_timeout: rides out a restart or reconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        delay = 0.05
        while True:
            try:
                return await fn(max(deadline - loop.time(), 0.01))
            except _TRANSIENT as exc:
                if loop.time() + delay >= deadline:
                    raise self._unavailable(op, exc) from exc
            except _ETCD_ERRORS as exc:
                raise self._unavailable(op, exc) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


def _o(timeout: float) -> dict[str, Any]:
    """Per-try kwargs for etcd3aio calls: our _call() owns the retries."""
    return {"timeout": timeout, "max_attempts": 1}


def _is_not_found(exc: BaseException | None) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.NOT_FOUND
