"""Async test helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def settle(predicate: Callable[[], bool], max_yields: int = 10_000) -> None:
    """Yield to the event loop (no wall-clock sleep) until `predicate()` holds."""
    for _ in range(max_yields):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached after yielding to the loop")
