"""Thundering herd (R-12): 5,000 simulated devices publishing through Mosquitto, the broker stopped
for 10 s under their load and started again — every device lost its connection at the same moment
and comes back at once. Devices reconnect with exponential backoff and full jitter (0.2 s doubling
to a 10 s cap), keep what they publish meanwhile in their local buffers, and the bridge resumes its
persistent session: every message is stored exactly once, ingestion is back within a bound this
test states, and the bridge's memory stays bounded while the herd arrives."""
from __future__ import annotations

import asyncio
import time

import pytest

from iotflow.registry import provision
from iotflow.simulator import FleetConfig, device_ids
from iotflow.testing import rss_kib, stack_service, stored_messages, wait_for
from tests.integration.test_mqtt_path import FleetThroughBridge

DEVICES = 5000
OUTAGE_S = 10
RECONNECTED_WITHIN_S = 60  # every device connected again after the broker is back
STORED_WITHIN_S = 300  # every message stored after the broker is back
BRIDGE_GROWTH_MIB = 100  # the bridge's RSS over its level before the outage, at most


@pytest.mark.timeout(900)
def test_five_thousand_devices_reconnecting_at_once_lose_nothing(settings, start_worker, run_id, tmp_path, chaos):
    per_device = 24  # at 0.2 msg/s: two minutes of sending, so the herd arrives while devices still publish
    prefix = f"th{run_id}"

    def register_first(worker) -> None:
        # The fleet registered, and known to the worker, before it sends: the herd is the subject
        # here, not 5,000 first registrations racing the telemetry they unlock.
        ids = device_ids(prefix, DEVICES)
        asyncio.run(provision(settings, ids, device_type="simulated"))
        worker.wait_registered(ids, timeout=300)

    run = FleetThroughBridge(settings, start_worker, run_id, tmp_path,
                             FleetConfig(devices=DEVICES, messages_per_device=per_device, rate_per_device=0.2, seed=9,
                                         heartbeat_s=60.0, prefix=prefix, register=False),
                             prepare=register_first,
                             IOTFLOW_BRIDGE_SUBSCRIPTION="exclusive")  # see test_mqtt_broker_restart.py
    try:
        devices = run.fleet.devices
        assert wait_for(lambda: run.stored() > 2000, timeout=300), f"stored {run.stored()} before the outage"
        assert all(d.connected.is_set() for d in devices)
        baseline = peak = rss_kib(run.bridge.pid)
        stack_service("down", "mosquitto")
        outage_until = time.monotonic() + OUTAGE_S
        while time.monotonic() < outage_until:
            assert run.sender.is_alive()  # devices keep producing into their local buffers
            time.sleep(0.5)
        stack_service("up", "mosquitto")
        back = time.monotonic()
        while (not all(d.report.connects >= 2 for d in devices)
               and time.monotonic() - back < RECONNECTED_WITHIN_S):
            peak = max(peak, rss_kib(run.bridge.pid))
            time.sleep(0.2)
        reconnected_s = time.monotonic() - back
        reconnected = sum(d.report.connects >= 2 for d in devices)
        assert run.sender.is_alive(), "the fleet finished before the herd was back: the outage came too late"
        run.sender.join(timeout=300)
        assert not run.sender.is_alive(), "the fleet did not finish after the broker came back"
        totals = run.result["totals"]
        assert totals["sent"] == DEVICES * per_device
        while run.stored() < totals["sent"] and time.monotonic() - back < STORED_WITHIN_S:
            peak = max(peak, rss_kib(run.bridge.pid))
            time.sleep(1)
        stored_s = time.monotonic() - back
        rows, messages = asyncio.run(stored_messages(settings, run.prefix))
        chaos(fault=f"{DEVICES} devices reconnect at once after Mosquitto was down {OUTAGE_S} s", sent=totals["sent"],
              stored=messages, lost=totals["sent"] - messages, duplicated=rows // 2 - messages,
              recovery_s=round(stored_s, 1), reconnected_s=round(reconnected_s, 1),
              bridge_rss_growth_mib=round((peak - baseline) / 1024, 1))
        assert reconnected == DEVICES, f"{reconnected} of {DEVICES} devices reconnected within {RECONNECTED_WITHIN_S} s"
        assert totals["connection_losses"] >= DEVICES and totals["buffer_overflows"] == 0
        assert (rows, messages) == (2 * totals["sent"], totals["sent"]), f"within {STORED_WITHIN_S} s"
        assert peak - baseline < BRIDGE_GROWTH_MIB * 1024, f"bridge RSS {baseline} KiB → {peak} KiB"
    finally:
        run.stop()
