"""Process lifecycle shared by the gateway and the worker."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, models, stubs) out of the collector's
    reach. Otherwise each full collection walks the torch and protobuf object graphs,
    a pause of tens of ms that inflates every call in flight: the gateway then measures
    a healthy worker as slow (seen as flaky routing in tests/integration/test_routing.py).
    """
    gc.collect()
    gc.freeze()


async def serve_until_signal(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start, serve until SIGTERM or SIGINT, then stop (drain) — also on errors."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await start()
        await stopping.wait()
    finally:
        await stop()
