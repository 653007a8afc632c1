"""RecordGuard: a worker watches its own registry key and puts its record back.

Anyone can delete or overwrite a key in etcd (etcdctl, a cleanup script, a
restored backup); the lease still lives, so nothing else would ever re-publish
the record and the worker would silently get no traffic until it restarted.

Which changes are ours is decided by revision, not by value: the registry
remembers the revision of its last write, so a late watch event for an older
write of ours (or an outsider's put of our exact bytes, without our lease) is
told apart without comparing bytes.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from meshserve.errors import RegistryUnavailable
from registry import keys
from registry.etcd import EtcdRegistry, WatchCompacted
from registry.events import RegistryEvent, WorkerEvent

log = logging.getLogger(__name__)


class RecordGuard:
    """Run `run()` as a task once the worker is registered; cancel it before deregister()."""

    def __init__(
        self,
        registry: EtcdRegistry,
        worker_id: str,
        *,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ) -> None:
        self._registry = registry
        self.worker_id = worker_id
        self._key = keys.worker_key(worker_id)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self.restored = 0  # another writer's changes it undid (tests, and a number to log)

    async def run(self) -> None:
        """Watch the key until cancelled. Never returns or raises on its own: etcd
        errors are retried with backoff (a dead guard would be silent)."""
        next_rev = self._registry.written_revision + 1
        backoff, outage = self._backoff_s, False
        while True:
            try:
                async for batch in self._registry.watch_registry(next_rev, key=self._key):
                    if outage:
                        log.info("record guard of %s: watching again", self.worker_id)
                    backoff, outage = self._backoff_s, False
                    for ev in batch:
                        await self._check(ev)
                        # Only after the check: one that failed is seen again on resume.
                        next_rev = max(next_rev, ev.revision + 1)
            except WatchCompacted as exc:
                if exc.compact_revision <= 0:  # canceled for another reason: retry
                    log.warning("record guard of %s: %s (retrying)", self.worker_id, exc)
                else:
                    # What changed in the compacted history is gone: put the record
                    # back unless we wrote it since, and go on from there.
                    log.info("record guard of %s: %s; checking from there", self.worker_id, exc)
                    next_rev = exc.compact_revision
                    try:
                        if await self._registry.restore(exc.compact_revision):
                            log.warning(
                                "worker %s: re-published its registry record (it may have "
                                "changed in history etcd compacted)",
                                self.worker_id,
                            )
                        continue
                    except RegistryUnavailable:
                        pass  # retried below, with the watch
            except RegistryUnavailable as exc:
                if not outage:
                    log.warning(
                        "record guard of %s: %s (retrying until etcd is back)",
                        self.worker_id,
                        exc.message,
                    )
                outage = True
            except Exception:  # a bug here must not end the guard, silently or not
                log.exception("record guard of %s: unexpected error (retrying)", self.worker_id)
            await asyncio.sleep(backoff)  # backoff while etcd is away, not a poll
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _check(self, ev: RegistryEvent) -> None:
        if not isinstance(ev, WorkerEvent) or ev.revision <= self._registry.written_revision:
            return  # our own write, or one we have written over since
        if ev.kind == "delete":
            what = "removed (deleted, expired or unreadable)"
        else:
            address = ev.record.address if ev.record is not None else "?"
            what = f"overwritten (address {address})"
        await self._registry.restore(ev.revision, partial(self._restoring, ev.revision, what))

    def _restoring(self, revision: int, what: str) -> None:
        # Before the put, once the registry is sure it is not a write of ours: whoever
        # sees the record back can also see why.
        self.restored += 1
        log.warning(
            "worker %s: its registry record was %s by another writer at revision %d; "
            "re-publishing it (%d times so far)",
            self.worker_id,
            what,
            revision,
            self.restored,
        )
