"""A small circuit breaker for asyncio callers (no library fits asyncio and our metrics well).

closed ──N consecutive failures──▶ open ──reset_after_s──▶ half-open ──success──▶ closed
                                    ▲                          │
                                    └────────failure───────────┘

While open, :meth:`CircuitBreaker.check` raises :class:`CircuitOpen` at once with the seconds
left, so callers back off instead of piling timeouts onto a dependency that is down.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from iotflow.errors import CircuitOpen


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return State.CLOSED
        if self._clock() - self._opened_at >= self.reset_after_s:
            return State.HALF_OPEN
        return State.OPEN

    def check(self) -> None:
        """Raise :class:`CircuitOpen` while the circuit is open; let a trial call through when half-open."""
        if self.state is State.OPEN:
            assert self._opened_at is not None
            retry_after = self.reset_after_s - (self._clock() - self._opened_at)
            raise CircuitOpen(self.name, retry_after)

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        self._failures += 1
        if self.state is State.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
