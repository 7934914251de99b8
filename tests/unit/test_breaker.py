from __future__ import annotations

import pytest

from iotflow.breaker import CircuitBreaker, State
from iotflow.errors import CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_circuit_opens_after_the_threshold_and_fails_fast():
    clock = Clock()
    breaker = CircuitBreaker("db", failure_threshold=3, reset_after_s=5, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    breaker.check()
    breaker.record_failure()
    assert breaker.state is State.OPEN
    clock.now = 2.0
    with pytest.raises(CircuitOpen) as caught:
        breaker.check()
    assert caught.value.retry_after == pytest.approx(3.0)
    assert caught.value.retriable


def test_after_the_reset_time_one_trial_call_decides():
    clock = Clock()
    breaker = CircuitBreaker("db", failure_threshold=1, reset_after_s=5, clock=clock)
    breaker.record_failure()
    clock.now = 5.0
    assert breaker.state is State.HALF_OPEN
    breaker.check()
    breaker.record_failure()  # the trial failed: open again for a full period
    assert breaker.state is State.OPEN
    clock.now = 10.0
    breaker.check()
    breaker.record_success()
    assert breaker.state is State.CLOSED


def test_a_success_resets_the_failure_count():
    breaker = CircuitBreaker("db", failure_threshold=2, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is State.CLOSED
