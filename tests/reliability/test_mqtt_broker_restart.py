"""Mosquitto restarted under load (R-12): devices keep what they could not send in their local
buffer and reconnect with backoff and full jitter, the bridge reconnects to its persistent
session — and every message is stored exactly once.

The bridge runs with an exclusive subscription here: Mosquitto 2.0 restores a persistent session's
plain subscriptions after a restart but not its shared ones, so with ``$share/…`` whatever devices
publish between the broker's restart and the bridges' reconnect is discarded by the broker (seen:
10,480 of 16,000 stored). docs/ingestion.md says how to choose."""
from __future__ import annotations

import asyncio
import time

import pytest

from iotflow.simulator import FleetConfig
from iotflow.testing import stack_service, stored_messages, wait_for
from tests.integration.test_mqtt_path import FleetThroughBridge


@pytest.mark.timeout(600)
def test_a_broker_restart_under_load_loses_nothing(settings, start_worker, run_id, tmp_path, chaos):
    run = FleetThroughBridge(settings, start_worker, run_id, tmp_path,
                             FleetConfig(devices=20, messages_per_device=800, rate_per_device=40.0, seed=5,
                                         prefix=f"mb{run_id}"),
                             IOTFLOW_BRIDGE_SUBSCRIPTION="exclusive")
    try:
        assert wait_for(lambda: run.stored() > 2000, timeout=90)
        stack_service("down", "mosquitto")  # SIGTERM: the broker saves its sessions and queued messages
        outage_until = time.monotonic() + 5
        while time.monotonic() < outage_until:
            assert run.sender.is_alive()  # devices keep producing into their local buffers
            time.sleep(0.5)
        stack_service("up", "mosquitto")
        back = time.monotonic()
        run.sender.join(timeout=300)
        assert not run.sender.is_alive(), "the fleet did not finish after the broker came back"
        totals = run.result["totals"]
        assert totals["sent"] == 16_000
        assert totals["connection_losses"] >= 20  # every device lost its connection and came back
        assert totals["buffer_overflows"] == 0
        assert wait_for(lambda: run.stored() == totals["sent"], timeout=300), f"stored {run.stored()} of {totals['sent']}"
        rows, messages = asyncio.run(stored_messages(settings, run.prefix))
        chaos(fault="Mosquitto restarted (5 s down), exclusive bridge subscription", sent=totals["sent"],
              stored=messages, lost=totals["sent"] - messages, duplicated=rows // 2 - messages,
              recovery_s=round(time.monotonic() - back, 1))
        assert (rows, messages) == (2 * totals["sent"], totals["sent"])
        assert run.log.read_text().count("mqtt_connected") >= 2  # the bridge reconnected
    finally:
        run.stop()
