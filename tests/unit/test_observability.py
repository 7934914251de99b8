"""Source partitions left unread are named in a warning once they stay so, not at every sample."""
from __future__ import annotations

from types import SimpleNamespace

from faust.types import TP
from structlog.testing import capture_logs

from iotflow.observability import HeldPartitions, standby_remaining

P5 = TP("sensor-data", 5)


def test_a_partition_held_past_the_threshold_is_named_with_its_reason_once_a_minute():
    held = HeldPartitions(after_s=30.0, every_s=60.0)
    with capture_logs() as logs:
        held.report({P5: "buffer_full"}, 0.0)
        held.report({P5: "buffer_full"}, 29.0)
        assert logs == []
        held.report({P5: "buffer_full"}, 31.0)
        held.report({P5: "buffer_full"}, 60.0)  # within the minute: not again
        held.report({P5: "buffer_full"}, 92.0)
    assert [(e["event"], e["partitions"]) for e in logs] == [("partitions_not_fetched", {"sensor-data:5": "buffer_full"})] * 2
    assert logs[0]["held_for_s"] == 31.0


def test_a_partition_read_again_starts_over():
    held = HeldPartitions(after_s=30.0, every_s=60.0)
    with capture_logs() as logs:
        held.report({P5: "paused"}, 0.0)
        held.report({}, 20.0)
        held.report({P5: "paused"}, 40.0)
        held.report({P5: "paused"}, 69.0)
    assert logs == []


def test_standby_records_left_count_partitions_nothing_was_read_of_yet():
    a, b, c, empty = (TP("app-marks-changelog", p) for p in range(4))
    recovery = SimpleNamespace(
        standby_highwaters={a: 99, b: 99, c: 99, empty: -1},  # the last offsets at the rebalance
        standby_offsets={a: 99, b: 49},  # a read to its end, b half, c nothing yet
    )
    assert standby_remaining(recovery) == 0 + 50 + 100
    assert standby_remaining(None) == 0
