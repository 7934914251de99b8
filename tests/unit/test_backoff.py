from __future__ import annotations

import random

import pytest

from hypothesis import given, strategies as st

from iotflow.backoff import TokenBuckets, full_jitter


@given(st.integers(min_value=0, max_value=100), st.integers(min_value=0, max_value=2**32))
def test_full_jitter_stays_within_the_exponential_ceiling(attempt, seed):
    delay = full_jitter(attempt, base_s=0.5, cap_s=30, rng=random.Random(seed))
    assert 0 <= delay <= min(30, 0.5 * 2**attempt)


def test_full_jitter_spreads_a_fleet_over_the_window():
    rng = random.Random(1)
    delays = [full_jitter(5, base_s=0.5, cap_s=30, rng=rng) for _ in range(1000)]
    assert min(delays) < 2 and max(delays) > 14  # spread over [0, 16), not bunched


def test_a_device_within_its_rate_is_never_delayed():
    buckets = TokenBuckets(rate_per_s=10, burst=1)
    assert [buckets.reserve("d", now=i * 0.1) for i in range(20)] == [0.0] * 20


def test_a_burst_passes_then_the_excess_is_delayed_in_order_not_dropped():
    buckets = TokenBuckets(rate_per_s=1, burst=3)
    assert [buckets.reserve("d", now=0) for _ in range(6)] == [0, 0, 0, 1, 2, 3]
    assert buckets.reserve("other", now=0) == 0  # buckets are per device


def test_idle_buckets_are_forgotten():
    buckets = TokenBuckets(rate_per_s=1, burst=1)
    buckets.reserve("d", now=0)
    buckets.forget_idle(now=5)
    assert len(buckets) == 0


def test_admit_takes_the_burst_then_refuses_without_taking_anything():
    buckets = TokenBuckets(rate_per_s=2.0, burst=3)
    assert [buckets.admit("a", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.admit("a", 100.0)
    assert wait == pytest.approx(0.5)
    # Refusals cost nothing: asking again and again does not push the next admission further out.
    assert [buckets.admit("a", 100.0) for _ in range(5)] == [pytest.approx(0.5)] * 5
    assert buckets.admit("a", 100.5) == 0.0 and buckets.admit("a", 100.5) > 0
    assert buckets.admit("b", 100.0) == 0.0  # each key its own budget
