"""What iotflow's background timers share: they survive their own bugs, and an outage of what they
call is reported as an outage, not as a line per attempt.

A Faust timer (``@app.timer``) that raises crashes the whole worker: Faust stops the app and the
process exits with 1, taking ingest down with a metrics sample or an outbox round. Timers that
are not the data path are wrapped in :func:`survives`: an unexpected exception is logged with its
traceback and counted (``iotflow_timer_failures_total{timer}``), and the next round runs as
usual. The ingest flush timer is deliberately left out: a batch it failed to flush is neither
stored nor acknowledged, and a restart (which reads it again from Kafka) is the safe answer there.

:class:`Outage` turns "failed again" into three kinds of line: the first failure, one summary per
``every_s`` while it lasts (with how many attempts failed), and the recovery with its length. A
timer retrying every 200 ms against a stopped database wrote five warnings a second before.
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import structlog

from iotflow import metrics

log = structlog.get_logger(__name__)


def survives(name: str) -> Callable[[Callable[[], Awaitable[None]]], Callable[[], Awaitable[None]]]:
    """Decorate a timer's body so that an unexpected exception is logged and counted, not fatal."""
    def wrap(body: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        failures = metrics.TIMER_FAILURES.labels(name)

        @functools.wraps(body)
        async def run() -> None:
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - see the module docstring: this timer must not stop the worker
                failures.inc()
                log.exception("timer_failed", timer=name)
        return run
    return wrap


class Outage:
    """Reports a recurring call's failures once per ``every_s`` instead of once per attempt."""

    def __init__(self, event: str, *, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.every_s = every_s
        self.clock = clock
        self.since: float | None = None
        self.failures = 0
        self._reported_at = 0.0

    def failed(self, exc: BaseException, **details: object) -> None:
        now = self.clock()
        self.failures += 1
        error = f"{exc.__class__.__name__}: {exc}"
        if self.since is None:
            self.since, self._reported_at = now, now
            log.warning(self.event, error=error, **details)
        elif now - self._reported_at >= self.every_s:
            self._reported_at = now
            log.warning(self.event, error=error, failing_for_s=round(now - self.since, 1),
                        failed_attempts=self.failures, **details)

    def succeeded(self) -> None:
        if self.since is not None:
            log.info(f"{self.event.removesuffix('_failed')}_recovered",
                     failed_for_s=round(self.clock() - self.since, 1), failed_attempts=self.failures)
            self.since, self.failures = None, 0
