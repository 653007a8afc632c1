"""Decoding etcd keys and values into registry events (no etcd client here)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from registry import aliases, keys, records
from registry.aliases import AliasRecord
from registry.records import WorkerRecord

log = logging.getLogger(__name__)

_EVENT_DELETE = 1  # mvccpb.Event.EventType.DELETE


@dataclass(frozen=True)
class WorkerEvent:
    kind: Literal["put", "delete"]
    worker_id: str
    record: WorkerRecord | None  # None for "delete"
    revision: int


@dataclass(frozen=True)
class AliasEvent:
    kind: Literal["put", "delete"]
    name: str
    alias: AliasRecord | None  # None for "delete"
    revision: int


RegistryEvent = WorkerEvent | AliasEvent
ALIASES = keys.ALIASES_PREFIX.encode()


def decode_worker(key: bytes, value: bytes) -> WorkerRecord | None:
    """Decode one worker value; log and return None when it is not one."""
    key_s = key.decode(errors="replace")
    worker_id = keys.worker_id_from_key(key_s)
    if worker_id is None:
        log.warning("ignoring etcd key %r: not a valid worker key", key_s)
        return None
    try:
        rec = records.decode(value)
    except Exception as exc:  # not only RecordDecodeError: one bad value must not stall the view
        log.warning("ignoring etcd key %r: %s", key_s, exc)
        return None
    if rec.worker_id != worker_id:
        log.warning("ignoring etcd key %r: record is for worker %r", key_s, rec.worker_id)
        return None
    return rec


def decode_alias(key: bytes, value: bytes) -> AliasRecord | None:
    try:
        alias = aliases.decode(value)
    except Exception as exc:  # one bad value must not stall the view
        log.warning("ignoring etcd key %r: %s", key.decode(errors="replace"), exc)
        return None
    if keys.alias_from_key(key.decode(errors="replace")) != alias.name:
        log.warning("ignoring etcd key %r: alias named %r", key, alias.name)
        return None
    return alias


def event(ev: Any) -> RegistryEvent | None:
    key = bytes(ev.kv.key)
    revision = int(ev.kv.mod_revision)
    deleted = ev.type == _EVENT_DELETE
    if key.startswith(ALIASES):
        name = keys.alias_from_key(key.decode(errors="replace"))
        if name is None:
            return None
        alias = None if deleted else decode_alias(key, bytes(ev.kv.value))
        return AliasEvent("delete" if alias is None else "put", name, alias, revision)
    worker_id = keys.worker_id_from_key(key.decode(errors="replace"))
    if worker_id is None:
        return None
    if not deleted:
        rec = decode_worker(key, bytes(ev.kv.value))
        if rec is not None:
            return WorkerEvent("put", worker_id, rec, revision)
    return WorkerEvent("delete", worker_id, None, revision)
