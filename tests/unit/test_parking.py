from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from iotflow.devices import DeviceStatus, RegistryEntry, registry_status
from iotflow.parking import ParkingLot


def lot(wait_s: float = 30.0, max_messages: int = 100) -> ParkingLot[str]:
    return ParkingLot(wait_s=wait_s, max_messages=max_messages, rng=random.Random(7))


def test_a_device_s_messages_wait_in_arrival_order_and_leave_together():
    parked = lot()
    parked.park(b"d1", 3, "m1", now_ms=0)
    parked.park(b"d2", 4, "x1", now_ms=1)
    parked.park(b"d1", 3, "m2", now_ms=2)
    assert parked.holds(b"d1") and len(parked) == 3 and parked.partition_of(b"d1") == 3
    assert parked.release(b"d1") == ["m1", "m2"]
    assert not parked.holds(b"d1") and len(parked) == 1


def test_the_registry_is_asked_again_with_growing_jittered_pauses_never_past_the_wait():
    parked = lot(wait_s=2.0)
    parked.park(b"d", 0, "m", now_ms=0)
    now, checks = 0, []
    while not parked.expired(b"d", now):
        due = parked.due(now)
        if due:
            checks.append(now)
            parked.retry_later(b"d", now)
        now += 1
    assert checks and checks[-1] <= 2000
    assert len(checks) < 40  # backoff, not a busy loop over 2,000 ms
    assert parked.due(2000) == [b"d"] and parked.expired(b"d", 2000)


def test_the_lot_is_full_at_its_bound_and_says_when_the_next_device_is_due():
    parked = lot(max_messages=3)
    assert parked.next_due_ms() is None
    for i, device in enumerate((b"a", b"a", b"b")):
        assert not parked.full
        parked.park(device, 0, f"m{i}", now_ms=100)
    assert parked.full
    assert 100 <= parked.next_due_ms() <= 150  # the first retry comes within 50 ms (jittered)
    parked.release(b"a")
    assert not parked.full and len(parked) == 1


def test_revoked_partitions_are_forgotten_and_their_messages_counted():
    parked = lot()
    parked.park(b"a", 0, "m", now_ms=0)
    parked.park(b"b", 1, "m", now_ms=0)
    parked.park(b"b", 1, "n", now_ms=0)
    assert parked.forget_partitions({1}) == 2
    assert parked.holds(b"a") and not parked.holds(b"b") and len(parked) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.booleans()), max_size=60))
def test_whatever_happens_every_parked_message_leaves_exactly_once_in_order(steps):
    parked, put, out = lot(max_messages=5), [], []
    for i, (device, release) in enumerate(steps):
        if release and parked.holds(device):
            out.extend(parked.release(device))
        elif not parked.full:
            parked.park(device, 0, (device, i), now_ms=i)
            put.append((device, i))
        assert len(parked) <= 5
    for device in (b"a", b"b", b"c"):
        if parked.holds(device):
            out.extend(parked.release(device))
    assert sorted(out) == sorted(put) and len(parked) == 0
    for device in (b"a", b"b", b"c"):  # each device's messages leave in the order they came
        assert [i for d, i in out if d == device] == [i for d, i in put if d == device]


def test_the_registry_table_value_says_registered_deleted_or_unknown():
    live = RegistryEntry({"id": "d", "version": 1, "deleted_at": None}, seq=1, events=1).encode()
    gone = RegistryEntry({"id": "d", "version": 2, "deleted_at": "2026-11-29T00:00:00Z"}, seq=2, events=2).encode()
    assert registry_status(live) is DeviceStatus.REGISTERED
    assert registry_status(gone) is DeviceStatus.DELETED
    assert registry_status(None) is DeviceStatus.UNKNOWN


def test_any_due_answers_whether_due_would_find_a_device_without_popping_anything():
    parked = lot(wait_s=2.0)
    assert not parked.any_due(10**9)  # nobody waits
    parked.park(b"d", 0, "m", now_ms=0)
    first = parked.next_due_ms()
    assert first is not None
    assert not parked.any_due(first - 1) and parked.due(first - 1) == []
    assert parked.any_due(first) and parked.due(first) == [b"d"]
