"""The single Kafka broker restarted under load (issue 7, scenario 3): the bridge holds the MQTT
messages it could not hand to Kafka unacknowledged (the broker session keeps them) and retries;
the worker's consumer and producers reconnect; every message is stored exactly once."""
from __future__ import annotations

import asyncio
import time

import pytest

from iotflow.simulator import FleetConfig
from iotflow.testing import http_json, stack_service, stored_messages, wait_for
from tests.integration.test_mqtt_path import FleetThroughBridge

OUTAGE_S = 10


@pytest.mark.timeout(900)
def test_a_kafka_broker_restart_under_load_loses_nothing(settings, start_worker, run_id, tmp_path, chaos):
    run = FleetThroughBridge(settings, start_worker, run_id, tmp_path,
                             FleetConfig(devices=20, messages_per_device=800, rate_per_device=40.0, seed=11,
                                         prefix=f"kb{run_id}"))
    try:
        assert wait_for(lambda: run.stored() > 2000, timeout=90)
        stack_service("down", "kafka")  # SIGTERM: a controlled shutdown, as a rolling restart does
        try:
            outage_until = time.monotonic() + OUTAGE_S
            while time.monotonic() < outage_until:
                run.worker.assert_running("while Kafka was down")
                assert run.bridge.poll() is None, "the bridge died while Kafka was down"
                time.sleep(0.5)
        finally:
            stack_service("up", "kafka")
        back = time.monotonic()
        run.sender.join(timeout=300)
        assert not run.sender.is_alive(), "the fleet did not finish after Kafka came back"
        sent = run.result["totals"]["sent"]
        assert sent == 16_000
        assert wait_for(lambda: run.stored() == sent, timeout=420), f"stored {run.stored()} of {sent}"
        recovery_s = round(time.monotonic() - back, 1)
        rows, messages = asyncio.run(stored_messages(settings, run.prefix))
        chaos(fault=f"Kafka broker restarted ({OUTAGE_S} s down)", sent=sent, stored=messages, lost=sent - messages,
              duplicated=rows // 2 - messages, recovery_s=recovery_s)
        assert (rows, messages) == (2 * sent, sent)
        # And the worker is ready again (its checks reach the broker), not just storing.
        assert wait_for(lambda: http_json("GET", f"{run.worker.url}/health/ready")[0] == 200, timeout=60)
    finally:
        run.stop()
