"""Counting the instructions a server process spends on a fixed amount of work, with
valgrind's callgrind: instrumentation off at start, switched on only around the work.

Counts do not depend on what else the machine runs, so differences of a percent between
arms are real; CPU seconds on this shared 2-core machine move by +-15% between trials.
Instructions are not cycles: they measure the work done, not cache or scheduling effects.
Under valgrind every second lasts ~50x longer, so whatever a process does per second
(timers, pollers, exporter threads) would weigh ~50x too much: an idle window measured
first gives that rate, and it is taken off the work's count.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshserve.launch import Child


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


def argv(out: Path, command: Sequence[str]) -> list[str]:
    """`command` under callgrind, writing its counts to `out` (and out.1: the idle window)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", *command]  # fmt: skip


async def control(pid: int, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", *args, str(pid),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid} failed")


def totals(path: Path) -> int:
    """The instruction total of a callgrind output file: its `totals:` line (the
    `summary:` line near the top stays 0 when instrumentation starts off)."""
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


@dataclass(frozen=True)
class Count:
    total: int  # instructions in the work's window
    idle_per_s: float  # the process's background rate, measured idle
    seconds: float  # the work's window

    def per(self, n: int) -> float:
        """Instructions per unit of work, the background over the window taken off."""
        return (self.total - self.idle_per_s * self.seconds) / n


async def count(
    child: Child,
    out: Path,
    work: Callable[[], Awaitable[None]],
    *,
    idle_s: float = 3.0,
    tail_s: float = 0.0,
) -> Count:
    """Counts for `work()` (and `tail_s` after it, e.g. for exports it triggered); stops
    the child (callgrind writes the window's counts at exit)."""
    await control(child.pid, "--zero")
    await control(child.pid, "-i", "on")
    await asyncio.sleep(idle_s)
    await control(child.pid, "--dump")  # -> out.1: the idle window
    start = time.perf_counter()
    await work()
    await asyncio.sleep(tail_s)
    seconds = time.perf_counter() - start
    await control(child.pid, "-i", "off")
    await child.stop(60)
    idle = totals(out.with_name(out.name + ".1")) / idle_s
    return Count(totals(out), idle, seconds)
