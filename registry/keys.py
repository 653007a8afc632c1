"""etcd key layout. Versioned so a future record format can live beside this one."""

from __future__ import annotations

import re

ROOT = "/meshserve/v1/"
WORKERS_PREFIX = ROOT + "workers/"

# Worker ids become etcd keys and log fields: keep them boring.
_WORKER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def valid_worker_id(worker_id: str) -> bool:
    return bool(_WORKER_ID.match(worker_id))


def worker_key(worker_id: str) -> str:
    if not valid_worker_id(worker_id):
        raise ValueError(
            f"invalid worker id {worker_id!r}: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return WORKERS_PREFIX + worker_id


def worker_id_from_key(key: str) -> str | None:
    if not key.startswith(WORKERS_PREFIX):
        return None
    rest = key[len(WORKERS_PREFIX) :]
    return rest if valid_worker_id(rest) else None


ALIASES_PREFIX = ROOT + "aliases/"


def alias_key(name: str) -> str:
    if not valid_worker_id(name):  # same rules: a plain, boring name
        raise ValueError(f"invalid alias {name!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return ALIASES_PREFIX + name


def alias_from_key(key: str) -> str | None:
    if not key.startswith(ALIASES_PREFIX):
        return None
    rest = key[len(ALIASES_PREFIX) :]
    return rest if valid_worker_id(rest) else None
