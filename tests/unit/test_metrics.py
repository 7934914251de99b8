"""``observe_all`` leaves a histogram exactly as ``observe`` of each amount would."""
from __future__ import annotations

from hypothesis import given, strategies as st
from prometheus_client import CollectorRegistry, Histogram

from iotflow.metrics import observe_all

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def samples(histogram: Histogram) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for metric in histogram.collect() for s in metric.samples
            if not s.name.endswith("_created")]


@given(st.lists(st.one_of(st.sampled_from(BUCKETS), st.floats(-10, 1000, allow_nan=False)), max_size=200))
def test_observe_all_counts_like_observe_one_at_a_time(amounts):
    one, many = (Histogram("h", "h", buckets=BUCKETS, registry=CollectorRegistry()) for _ in range(2))
    for amount in amounts:
        one.observe(amount)
    observe_all(many, amounts)
    assert samples(many)[:-1] == samples(one)[:-1]  # buckets and count exactly
    assert abs(samples(many)[-1][2] - samples(one)[-1][2]) <= 1e-9 * max(1.0, sum(map(abs, amounts)))  # the sum


def test_an_amount_on_a_bound_goes_to_that_bucket():
    histogram = Histogram("h", "h", buckets=BUCKETS, registry=CollectorRegistry())
    observe_all(histogram, [0.1, 0.1, 7.0])
    buckets = {s.labels["le"]: s.value for s in histogram.collect()[0].samples if s.name == "h_bucket"}
    assert buckets["0.05"] == 0 and buckets["0.1"] == 2 and buckets["5.0"] == 2 and buckets["+Inf"] == 3
