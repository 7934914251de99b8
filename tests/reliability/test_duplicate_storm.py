"""The duplicate storm (issue 7, scenario 10): devices send 30% of their messages twice, byte for
byte (a device retry), through MQTT, bridge and worker — no row is stored twice, and the
accounting counts each retry as a duplicate, not as a new message."""
from __future__ import annotations

import asyncio

import pytest

from iotflow.simulator import FleetConfig
from iotflow.testing import http_get_json, stored_messages, wait_for
from tests.integration.test_mqtt_path import FleetThroughBridge


@pytest.mark.timeout(600)
def test_thirty_percent_duplicates_store_no_row_twice(settings, start_worker, run_id, tmp_path, chaos):
    run = FleetThroughBridge(settings, start_worker, run_id, tmp_path,
                             FleetConfig(devices=20, messages_per_device=500, rate_per_device=50.0, seed=17,
                                         duplicate_ratio=0.30, prefix=f"ds{run_id}"))
    try:
        run.sender.join(timeout=300)
        assert not run.sender.is_alive(), "the fleet did not finish"
        totals = run.result["totals"]
        sent, retries = totals["sent"], totals["duplicates"]
        assert sent == 10_000 and 0.25 * sent <= retries <= 0.35 * sent  # the storm happened
        assert wait_for(lambda: run.stored() == sent, timeout=300), f"stored {run.stored()} of {sent}"

        def accounts() -> dict | None:
            status, body = http_get_json(f"{run.worker.url}/api/v1/pipeline/accounting", headers=run.worker.bearer())
            assert status == 200, body
            return body if body["received"] >= sent + retries else None
        fleet = wait_for(accounts, timeout=120)
        assert fleet, "the retries were not all counted"
        rows, messages = asyncio.run(stored_messages(settings, run.prefix))
        chaos(fault=f"{retries} of {sent + retries} deliveries are device retries (30%)", sent=sent, stored=messages,
              lost=sent - messages, duplicated=rows // 2 - messages)
        assert (rows, messages) == (2 * sent, sent)
        assert fleet["accepted"] == sent
        # At least every device retry; more when MQTT or the bridge delivered a message twice.
        assert fleet["duplicates"] >= retries and fleet["received"] == fleet["accepted"] + fleet["duplicates"]
    finally:
        run.stop()
