"""The worker's garbage-collector tuning: objects made at start frozen, a larger young generation."""
from __future__ import annotations

import gc

from iotflow.worker import tune_gc


def test_objects_made_at_start_are_frozen_and_the_young_generation_is_larger():
    before = gc.get_threshold()
    try:
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() > 1000  # this process's modules, classes and functions at least
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
