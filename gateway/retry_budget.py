"""A retry budget: retries at most `ratio` of the calls seen over a sliding window, plus
a small floor per second (the shape of Finagle's RetryBudget and Envoy's retry budget).

Why a budget and not only a per-call cap: under overload every call that fails would
otherwise be sent again, and the extra load makes more calls fail (a retry storm). With
a budget, retries stay a bounded fraction of the load whatever fails.

Counts live in one-second buckets of a ring, so recording a call is an index and an add
(it runs once per call on the request path).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_s: float = 5.0,
        window_s: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= ratio <= 1.0 or min_per_s < 0 or window_s < 1:
            raise ValueError("retry budget: ratio in [0, 1], min_per_s >= 0, window_s >= 1")
        self.ratio = ratio
        self.floor = min_per_s * window_s  # retries always allowed per window
        self._window = window_s
        self._clock = clock
        self._calls = [0] * window_s
        self._retries = [0] * window_s
        self._second = int(clock())
        self.exhausted = 0  # retries refused, for metrics and the reliability report

    def _advance(self) -> int:
        now = int(self._clock())
        gone = now - self._second
        if gone > 0:  # clear the buckets that left the window
            for s in range(self._second + 1, self._second + 1 + min(gone, self._window)):
                self._calls[s % self._window] = 0
                self._retries[s % self._window] = 0
            self._second = now
        return now % self._window

    def on_call(self) -> None:
        """A call arrived (its first attempt)."""
        self._calls[self._advance()] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        i = self._advance()
        if sum(self._retries) < self.ratio * sum(self._calls) + self.floor:
            self._retries[i] += 1
            return True
        self.exhausted += 1
        return False

    def snapshot(self) -> tuple[int, int]:
        """(calls, retries) over the window."""
        self._advance()
        return sum(self._calls), sum(self._retries)
