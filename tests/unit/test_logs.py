"""Repeated warnings are reported once per interval, with a count of those held back."""
from __future__ import annotations

import logging

from iotflow.logs import RepeatFilter, Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_throttle_reports_the_first_then_counts_until_the_interval_passed():
    clock = Clock()
    throttle = Throttle(10.0, clock)
    assert throttle.allow("t") == 0
    assert [throttle.allow("t") for _ in range(3)] == [None, None, None]
    assert throttle.allow("other") == 0  # keys are apart
    clock.now += 10.0
    assert throttle.allow("t") == 3
    assert throttle.allow("t") is None


def _record(msg: str, level: int = logging.ERROR, *args: object) -> logging.LogRecord:
    return logging.LogRecord("aiokafka.conn", level, __file__, 1, msg, args, None)


def test_the_filter_groups_by_template_and_notes_what_it_held_back():
    clock = Clock()
    repeat = RepeatFilter(10.0, clock)
    template = "Unable connect to node with id %s: %s"
    assert repeat.filter(_record(template, logging.ERROR, 1, "refused"))
    assert not any(repeat.filter(_record(template, logging.ERROR, 1, f"refused {i}")) for i in range(500))
    assert repeat.filter(_record("Unable to update metadata from %r", logging.ERROR, [1]))  # another template
    assert repeat.filter(_record("Joined group", logging.INFO))  # below WARNING: never held back
    assert repeat.filter(_record("Joined group", logging.INFO))
    clock.now += 10.0
    summary = _record(template, logging.ERROR, 1, "refused")
    assert repeat.filter(summary)
    assert summary.getMessage() == "Unable connect to node with id 1: refused [500 similar messages held back]"
