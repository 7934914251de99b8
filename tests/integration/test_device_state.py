"""Two workers: the registry table is split between them, and GET /devices/{id}/state answers the
same from either (the one that does not own the device forwards to the one that does)."""
from __future__ import annotations

import pytest

from iotflow.testing import http_json, wait_for

DEVICES = 24


@pytest.mark.timeout(300)
def test_state_answers_the_same_from_either_of_two_workers(settings, start_worker, run_id):
    one = start_worker()
    one.wait_ready()
    two = start_worker()
    two.wait_ready()
    ids = [f"st-{run_id}-{i}" for i in range(DEVICES)]
    admin = one.bearer("admin")
    for i, device_id in enumerate(ids):
        status, _, body = http_json("POST", f"{one.url}/api/v1/devices",
                                    {"id": device_id, "name": "n", "type": "t", "firmware_version": f"1.{i}"},
                                    headers=admin)
        assert status == 201, body
    http_json("PATCH", f"{two.url}/api/v1/devices/{ids[0]}", {"status": "inactive"}, headers=admin)

    def state(worker, device_id: str) -> dict | None:
        status, _, body = http_json("GET", f"{worker.url}/api/v1/devices/{device_id}/state",
                                    headers=worker.bearer())
        return body if status == 200 else None

    def settled() -> bool:
        first = state(one, ids[0])
        return bool(first and first["version"] == 2 and all(state(one, d) for d in ids))

    assert wait_for(settled, timeout=120), [state(one, d) for d in ids[:3]]
    from_one = {d: state(one, d) for d in ids}
    from_two = {d: state(two, d) for d in ids}
    assert from_one == from_two
    assert from_one[ids[0]]["status"] == "inactive" and from_one[ids[0]]["events_applied"] == 2
    assert {from_one[d]["firmware_version"] for d in ids} == {f"1.{i}" for i in range(DEVICES)}
    # Both workers own partitions (the split is real, not one worker answering for all).
    status, _, fleet = http_json("GET", f"{one.url}/api/v1/pipeline/accounting", headers=one.bearer())
    assert status == 200 and len(fleet["workers"]) == 2, fleet
