"""What the scenario reads besides the registry: memory, CPU, loop stalls, the
machine's pressure and etcd's disk histograms (also used inside the children)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time

DISK_HISTOGRAMS = (
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_backend_commit_duration_seconds",
)
Histograms = dict[str, dict[str, float]]


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_s() -> float:
    """This process's CPU time, all threads (gRPC's poller threads included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def stall_meter(out: list[float], period: float = 0.01) -> None:
    """How late a 10 ms sleep wakes up, in ms: in the orchestrator, the scheduling stalls
    any process on this machine suffers meanwhile; in a host, its event loop's lag."""
    while True:
        start = time.monotonic()
        await asyncio.sleep(period)
        out.append((time.monotonic() - start - period) * 1000)


def pressure() -> dict[str, float]:
    """Linux PSI "some" totals (µs) for cpu and io; empty where PSI is unavailable."""
    out = {}
    for kind in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{kind}") as f:
                some = f.readline().split()
        except OSError:
            continue
        out[kind] = float(some[-1].removeprefix("total="))
    return out


async def etcd_histograms(endpoint: str) -> Histograms:
    """Cumulative bucket counts of etcd's disk histograms, from its /metrics."""
    host, port = endpoint.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n".encode())
        await writer.drain()
        body = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    out: Histograms = {}
    for line in body.splitlines():
        name, _, rest = line.partition('_bucket{le="')
        if name in DISK_HISTOGRAMS:
            le, _, value = rest.partition('"} ')
            out.setdefault(name, {})[le] = float(value)
    return out
