"""The storm's hostile payloads are invalid by construction: every strategy, many seeds."""
from __future__ import annotations

import time
from collections import Counter

import pytest

from iotflow.errors import InvalidPayload
from iotflow.fuzz import STRATEGIES, hostile_payloads
from iotflow.telemetry import Limits, parse


@pytest.mark.parametrize("seed", range(5))
def test_every_hostile_payload_is_refused_by_the_parser(seed):
    payloads = hostile_payloads(["storm-a", "storm-b"], 2000, seed=seed, now_ms=int(time.time() * 1000))
    assert Counter(name for _, name, _ in payloads).keys() == STRATEGIES.keys()
    for device, name, raw in payloads:
        with pytest.raises(InvalidPayload):
            parse(raw, Limits())
            pytest.fail(f"{name} payload for {device} was accepted: {raw[:120]!r}")


def test_payloads_go_to_the_devices_in_turn_and_numbering_keeps_storms_apart():
    now = int(time.time() * 1000)
    first = hostile_payloads(["a", "b", "c"], 300, seed=1, now_ms=now)
    assert [d for d, _, _ in first[:6]] == ["a", "b", "c", "a", "b", "c"]
    second = hostile_payloads(["a", "b", "c"], 300, seed=1, now_ms=now, first=300)
    structured = {raw for _, name, raw in first if name in ("wrong_type", "unknown_field", "missing_field")}
    assert structured.isdisjoint(raw for _, _, raw in second)
