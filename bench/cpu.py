"""CPU time of processes (from /proc) and which CPUs each benchmark role runs on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / _TICK  # fields 14 and 15 of proc(5)


def cpu_seconds_or_none(pid: int) -> float | None:
    """cpu_seconds, or None once the process is gone."""
    try:
        return cpu_seconds(pid)
    except (OSError, ValueError):
        return None


def cpu_snapshot(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


async def cpu_at_edges(
    pids: Iterable[int], edges: Sequence[float], marks: list[tuple[float, dict[int, float]]]
) -> None:
    """Append (time, CPU seconds per pid) at each of `edges` (perf_counter times): the
    measurement window's start and end, read while the load runs."""
    for edge in edges:
        await asyncio.sleep(max(0.0, edge - time.perf_counter()))
        marks.append((time.perf_counter(), cpu_snapshot(pids)))


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Pin every existing thread of `pid` (sched_setaffinity applies per thread; threads
    created later inherit from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each role runs on; None = wherever the kernel likes."""

    hop: set[int] | None = None  # gateway and proxy
    worker: set[int] | None = None
    client: set[int] | None = None
    etcd: set[int] | None = None

    def _roles(self) -> tuple[tuple[str, set[int] | None], ...]:
        return (
            ("hop", self.hop),
            ("worker", self.worker),
            ("client", self.client),
            ("etcd", self.etcd),
        )

    def describe(self) -> str:
        if self.hop is None and self.worker is None and self.client is None:
            return "none (all processes float over all CPUs)"
        return ", ".join(f"{role}={sorted(c)}" for role, c in self._roles() if c is not None)

    def as_dict(self) -> dict[str, list[int] | None]:
        return {role: sorted(c) if c is not None else None for role, c in self._roles()}


def pinning(mode: str) -> Pinning:
    """`none`; or `split`: the hop on the last CPU, worker and etcd on the first, the
    client with the hop (so the direct arm's client gets the CPU the hop would use)."""
    cpus = available_cpus()
    if mode == "none" or len(cpus) < 2:
        return Pinning()
    if mode == "split":
        first, last = {cpus[0]}, {cpus[-1]}
        return Pinning(hop=last, worker=first, client=last, etcd=first)
    raise ValueError(f"unknown pinning {mode!r}: none or split")
