from __future__ import annotations

import json

import pytest

from iotflow.errors import InvalidRequest
from iotflow.flags import Flag, bucket, parse_flag


def test_a_percentage_covers_about_that_share_and_grows_without_reshuffling():
    devices = [f"d-{i}" for i in range(10_000)]
    ten = {d for d in devices if Flag("rollouts.delta_updates", True, 10).applies_to(d)}
    thirty = {d for d in devices if Flag("rollouts.delta_updates", True, 30).applies_to(d)}
    assert 800 < len(ten) < 1200 and 2700 < len(thirty) < 3300
    assert ten <= thirty  # raising the percentage only adds devices
    assert not any(Flag("rollouts.delta_updates", False, 100).applies_to(d) for d in devices[:100])
    # Two flags at 10% do not pick the same devices.
    other = {d for d in devices if Flag("another.flag", True, 10).applies_to(d)}
    assert len(ten & other) < 300
    assert all(0 <= bucket("x", d) < 100 for d in devices[:100])


def test_a_flag_setting_names_every_bad_field():
    assert parse_flag("rollouts.kill_switch", b'{"enabled": true}') == Flag("rollouts.kill_switch", True, 100)
    with pytest.raises(InvalidRequest) as caught:
        parse_flag("Bad Name", json.dumps({"enabled": "yes", "percentage": 101, "colour": 1}).encode())
    assert {e["field"] for e in caught.value.errors} == {"name", "enabled", "percentage", "colour"}
