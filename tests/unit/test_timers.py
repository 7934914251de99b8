"""Background timers: a bug in one does not stop the worker; an outage is reported, not repeated."""
from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from iotflow import metrics
from iotflow.agents.timers import Outage, survives


def failures(name: str) -> float:
    return metrics.TIMER_FAILURES.labels(name)._value.get()


def test_an_unexpected_error_in_a_timer_is_logged_with_its_traceback_and_counted_not_raised():
    rounds = []

    @survives("test_timer")
    async def round_() -> None:
        rounds.append(1)
        raise KeyError("gone mid-rebalance")

    before = failures("test_timer")
    with capture_logs() as logs:
        asyncio.run(round_())
        asyncio.run(round_())  # and the next round runs as usual
    assert rounds == [1, 1]
    assert failures("test_timer") == before + 2
    assert [(e["event"], e["timer"], e["log_level"]) for e in logs] == [("timer_failed", "test_timer", "error")] * 2
    assert logs[0]["exc_info"] is True


def test_a_cancelled_timer_still_stops():
    @survives("test_cancelled")
    async def round_() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(round_())
    assert failures("test_cancelled") == 0


def test_an_outage_is_one_warning_then_one_summary_per_period_then_its_recovery():
    now = [0.0]
    outage = Outage("relay_failed", every_s=30.0, clock=lambda: now[0])
    refused = ConnectionRefusedError(111, "Connect call failed")
    with capture_logs() as logs:
        for second in range(0, 65):  # five attempts a second for 65 s
            for fifth in range(5):
                now[0] = second + fifth / 5
                outage.failed(refused, devices=3)
        now[0] = 70.0
        outage.succeeded()
        outage.succeeded()  # nothing more while healthy
    assert [e["event"] for e in logs] == ["relay_failed"] * 3 + ["relay_recovered"]
    assert logs[0]["error"] == "ConnectionRefusedError: [Errno 111] Connect call failed"
    assert logs[0]["devices"] == 3 and "failed_attempts" not in logs[0]
    assert (logs[1]["failing_for_s"], logs[1]["failed_attempts"]) == (30.0, 151)
    assert (logs[2]["failing_for_s"], logs[2]["failed_attempts"]) == (60.0, 301)
    assert (logs[3]["failed_for_s"], logs[3]["failed_attempts"], logs[3]["log_level"]) == (70.0, 325, "info")


def test_a_new_outage_after_a_recovery_is_reported_from_its_first_failure():
    now = [0.0]
    outage = Outage("relay_failed", clock=lambda: now[0])
    with capture_logs() as logs:
        outage.failed(OSError("down"))
        now[0] = 5.0
        outage.succeeded()
        now[0] = 6.0
        outage.failed(OSError("down again"))
    assert [(e["event"], e.get("failed_attempts")) for e in logs] == [
        ("relay_failed", None), ("relay_recovered", 1), ("relay_failed", None)]
