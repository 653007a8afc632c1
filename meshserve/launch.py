"""Child processes: started with a log file, checked, stopped (SIGTERM, then SIGKILL).

The one launcher of `meshserve up`, EtcdProcess and the benchmarks. Popen, not asyncio's
subprocess: stop() and kill() work from any event loop or none, and an exit is seen by
polling, which needs no child watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from meshserve.grpc_server import CHANNEL_OPTIONS

# Every child: output unbuffered (its log is read while it runs), never a download.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
_POLL_S = 0.02


class ChildExited(RuntimeError):
    """A child process is gone while it was expected to run."""


def meshserve_argv(*args: str) -> list[str]:
    """`python -m meshserve ARGS...` with this interpreter."""
    return [sys.executable, "-m", "meshserve", *args]


def module_argv(module: str, *args: str) -> list[str]:
    """`python -m MODULE ARGS...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""  # host:port it serves on, where it serves
    log_offset: int = 0  # where this run's output starts (the log may be appended to)
    _terminated: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def stdin(self) -> IO[bytes]:
        """The pipe to the child's stdin (launched with pipes=True)."""
        if self.popen.stdin is None:
            raise RuntimeError(f"{self.name} was launched without pipes")
        return self.popen.stdin

    @property
    def stdout(self) -> IO[bytes]:
        """The pipe from the child's stdout (launched with pipes=True)."""
        if self.popen.stdout is None:
            raise RuntimeError(f"{self.name} was launched without pipes")
        return self.popen.stdout

    def log_tail(self, max_bytes: int = 3000) -> str:
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self.log_offset, size - max_bytes))
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"<cannot read log: {exc}>"

    def check_alive(self) -> None:
        """Raise ChildExited, with the log's tail, if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise ChildExited(
                f"{self.name} exited with code {code}; log tail ({self.log_path}):\n"
                f"{self.log_tail()}"
            )

    def terminate(self) -> None:
        """SIGTERM, once: a second one must not cut a graceful shutdown short."""
        if not self._terminated and self.running:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL now; does not wait (safe from a watchdog thread)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()

    async def wait(self, timeout_s: float | None = None) -> int | None:
        """The exit code, or None if it still runs after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (code := self.popen.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            await asyncio.sleep(_POLL_S)
        return code

    async def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, up to `grace_s` to exit, then SIGKILL. Idempotent."""
        self.terminate()
        code = await self.wait(grace_s)
        if code is None:
            self.kill()
            code = await self.wait(5.0)
        return code


def launch(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    address: str = "",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    new_session: bool = False,
    cpus: Collection[int] | None = None,
    append: bool = False,
    pipes: bool = False,
) -> Child:
    """Start `argv` with stdout and stderr in `log_path` (appended to with `append`).

    new_session: Ctrl-C in a terminal reaches the parent only, which stops its children
    in order. cpus: every thread pinned to these CPUs (taskset execs the command: same
    pid). pipes: stdin and stdout are pipes to the parent, stderr alone goes to the log.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if append and log_path.exists() else 0
    command = list(argv)
    if cpus is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError("CPU pinning needs taskset (util-linux) on PATH")
        command = [taskset, "-c", ",".join(map(str, sorted(cpus))), *command]
    with log_path.open("ab" if append else "wb") as log:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else log,
            stderr=log if pipes else subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **CHILD_ENV, **(env or {})},
            start_new_session=new_session,
        )
    return Child(name, popen, log_path, address, offset)


async def stop_all(children: Iterable[Child], grace_s: float = 5.0) -> None:
    """SIGTERM to every child first (they drain in parallel), then stop each."""
    children = list(children)
    for c in children:
        c.terminate()
    await asyncio.gather(*(c.stop(grace_s) for c in children))


async def wait_until_serving(
    child: Child,
    probe: Callable[[grpc.aio.Channel], Awaitable[object]],
    timeout_s: float = 60.0,
) -> None:
    """Retry `probe` (a real call on a channel to `child.address`) until it succeeds;
    ChildExited as soon as the child is gone."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    async with grpc.aio.insecure_channel(child.address, options=CHANNEL_OPTIONS) as channel:
        while time.monotonic() < deadline:
            child.check_alive()
            try:
                await asyncio.wait_for(probe(channel), 5.0)
                return
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                last = exc
            await asyncio.sleep(0.2)  # polling another process's start-up
    raise RuntimeError(f"{child.name} at {child.address} not serving after {timeout_s}s: {last}")
