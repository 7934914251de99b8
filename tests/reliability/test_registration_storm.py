"""A fleet provisioned and switched on at once: 5,000 simulated devices each register through the
API and start publishing right away, through Mosquitto and the bridge. The registry table learns
each registration from device-events a moment later; the telemetry that arrives first waits for
it, and waiting devices are also asked of PostgreSQL — before that, a saturated worker applied the
registrations later than the wait allows (its fetcher, blocked on the full telemetry buffer, did not
deliver device-events) and 9,012 of 120,000 messages went to the DLQ as ``unknown_device``. Now
every message is stored exactly once and none is refused."""
from __future__ import annotations

import asyncio

import pytest

from iotflow.simulator import FleetConfig
from iotflow.testing import dlq_messages, stored_messages, wait_for
from tests.integration.test_mqtt_path import FleetThroughBridge

DEVICES = 5000
PER_DEVICE = 12


@pytest.mark.timeout(900)
def test_five_thousand_devices_registering_while_they_send_lose_nothing_to_the_dlq(settings, start_worker, run_id,
                                                                                  tmp_path, chaos):
    prefix = f"rs{run_id}"
    run = FleetThroughBridge(settings, start_worker, run_id, tmp_path,
                             FleetConfig(devices=DEVICES, messages_per_device=PER_DEVICE, rate_per_device=0.2, seed=5,
                                         heartbeat_s=60.0, prefix=prefix, register=True),
                             IOTFLOW_BRIDGE_SUBSCRIPTION="exclusive")
    try:
        run.sender.join(timeout=600)
        assert not run.sender.is_alive(), "the fleet did not finish"
        sent = run.result["totals"]["sent"]
        assert sent == DEVICES * PER_DEVICE
        assert wait_for(lambda: run.stored() >= sent, timeout=300), f"stored {run.stored()} of {sent}"
        rows, messages = asyncio.run(stored_messages(settings, prefix))
        refused = [r for r in asyncio.run(dlq_messages(settings)) if (r.key or b"").startswith(prefix.encode())]
        chaos(fault=f"{DEVICES} devices register through the API while they send", sent=sent, stored=messages,
              lost=sent - messages, duplicated=rows // 2 - messages, dlq=len(refused))
        assert refused == []
        assert (rows, messages) == (2 * sent, sent)
    finally:
        run.stop()
