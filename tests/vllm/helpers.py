"""What the vLLM tier's fixtures and tests share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from meshserve.vllm_demo import VLLM_TINY_LLAMA

MODEL = VLLM_TINY_LLAMA
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 8


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` (for state in another process) until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(0.005)
