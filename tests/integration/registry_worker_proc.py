"""A minimal worker process for test_registry: register, say so, then idle.

Usage: python registry_worker_proc.py ENDPOINT WORKER_ID TTL
The test SIGKILLs it to check that the lease (not a goodbye) removes the record.
"""

from __future__ import annotations

import asyncio
import sys

from registry.etcd import EtcdRegistry
from registry.records import WorkerRecord


async def main(endpoint: str, worker_id: str, ttl: int) -> None:
    async with EtcdRegistry([endpoint], ttl=ttl) as registry:
        await registry.register(WorkerRecord(worker_id=worker_id, address="127.0.0.1:1"))
        print("registered", flush=True)
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
