"""End to end through MQTT: simulated devices → Mosquitto → bridge → Kafka → worker → PostgreSQL."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from iotflow.mqtt_auth import Account
from iotflow.simulator import Fleet, FleetConfig
from iotflow.stack.base import free_loopback_port
from iotflow.testing import (WorkerProcess, device_credentials, dlq_messages, forget_device_accounts,
                             forget_mqtt_session, http_get_json, mqtt_client, register, stored_messages, telemetry,
                             wait_for)


def start_bridge(settings, tmp_path: Path, client_id: str, metrics_port: int | None = None,
                 **extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **extra, "IOTFLOW_TOPIC_PREFIX": settings.topic_prefix, "IOTFLOW_BRIDGE_CLIENT_ID": client_id,
           "IOTFLOW_BRIDGE_GROUP": f"g{settings.topic_prefix}", "IOTFLOW_BRIDGE_DEVICE_RATE_PER_S": "1000",
           "IOTFLOW_BRIDGE_DEVICE_BURST": "1000", "IOTFLOW_BRIDGE_METRICS_PORT": str(metrics_port or free_loopback_port())}
    with open(tmp_path / f"bridge-{client_id}.log", "ab") as log:
        return subprocess.Popen([str(Path(sys.executable).with_name("iotflow")), "bridge"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def bridge_metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


class FleetThroughBridge:
    """A worker and a bridge for this test, then a simulated fleet sending in a thread: the
    setting of every fault test on the MQTT path. ``result`` has the fleet's summary once
    ``sender`` has finished."""

    def __init__(self, settings, start_worker, run_id: str, tmp_path: Path, config: FleetConfig,
                 prepare: Callable[[WorkerProcess], None] | None = None, **bridge_env: str) -> None:
        self.bridge_env = bridge_env
        self.worker = start_worker()
        self.worker.wait_ready()
        if prepare is not None:
            prepare(self.worker)  # e.g. register the fleet and wait until the worker knows it
        self.settings, self.tmp_path, self.client_id = settings, tmp_path, f"bridge-{run_id}"
        self.log = tmp_path / f"bridge-{self.client_id}.log"
        self.bridge = self.start_bridge()
        wait_for_log(self.log, "mqtt_connected")
        self.prefix = config.prefix + "-"
        self.result: dict = {}
        self.fleet = fleet = Fleet(settings, config)
        self.sender = threading.Thread(target=lambda: self.result.update(fleet.run()))
        self.sender.start()

    def start_bridge(self) -> subprocess.Popen[bytes]:
        return start_bridge(self.settings, self.tmp_path, self.client_id, **self.bridge_env)  # same id: same session

    def stored(self) -> int:
        return asyncio.run(stored_messages(self.settings, self.prefix))[1]

    def stop(self) -> None:
        self.bridge.terminate()
        self.bridge.wait(timeout=30)
        forget_mqtt_session(self.settings, self.client_id)
        self.sender.join(timeout=60)
        forget_device_accounts(self.settings, (d.report.device_id for d in self.fleet.devices))


def wait_for_log(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.1)


@pytest.mark.timeout(1500)
def test_fifty_devices_with_duplicates_and_malformed_store_exactly_the_unique_valid_messages(
    settings, start_worker, run_id, tmp_path
):
    worker = start_worker()
    worker.wait_ready()
    metrics_port = free_loopback_port()
    bridge = start_bridge(settings, tmp_path, f"bridge-{run_id}", metrics_port)
    try:
        wait_for_log(tmp_path / f"bridge-bridge-{run_id}.log", "mqtt_connected")
        config = FleetConfig(devices=50, messages_per_device=1000, rate_per_device=100.0, duplicate_ratio=0.10,
                             malformed_ratio=0.02, seed=7, prefix=f"mq{run_id}")
        summary = Fleet(settings, config).run()
        totals = summary["totals"]
        assert totals["sent"] == 50_000
        assert totals["duplicates"] > 0 and totals["malformed"] > 0

        # The worker's rate (docs/performance.md) is the bound here: on a just-started stack it has
        # been seen near 125 msg/s, so 50,000 messages may need several minutes.
        deadline = time.monotonic() + 1200
        while asyncio.run(stored_messages(settings, f"mq{run_id}-"))[1] < totals["sent"]:
            assert time.monotonic() < deadline, "not everything the devices sent was stored in time"
            time.sleep(1)
        rows, messages = asyncio.run(stored_messages(settings, f"mq{run_id}-"))
        assert (rows, messages) == (2 * totals["sent"], totals["sent"])

        # MQTT QoS 1 and the bridge's retries are at-least-once: a message can reach Kafka twice.
        # A valid one is then a duplicate; a malformed one (no msg_id to dedup by) is sent to the
        # DLQ again. So the DLQ holds every malformed payload, each at least once. (Payloads of one
        # malformed kind can be byte-identical, so they are counted, not compared as a set.)
        dead = asyncio.run(dlq_messages(settings))
        assert totals["malformed"] <= len(dead) <= totals["malformed"] + totals["sent"] // 100
        assert all(dict(m.headers)["iotflow-reason"] for m in dead)

        status, fleet = http_get_json(f"{worker.url}/api/v1/pipeline/accounting", headers=worker.bearer())
        assert status == 200
        assert fleet["accepted"] == totals["sent"]
        assert fleet["duplicates"] >= totals["duplicates"]
        assert totals["malformed"] <= fleet["invalid"] <= len(dead)
        assert fleet["gaps"] == 0 and fleet["healthy"]

        # The bridge's own /metrics: every message it took from MQTT was forwarded (at least once).
        assert bridge_metric(metrics_port, "iotflow_bridge_forwarded_total") >= totals["sent"] + totals["malformed"]
        assert bridge_metric(metrics_port, "iotflow_bridge_in_flight") == 0
    finally:
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(timeout=30) == 0
        forget_mqtt_session(settings, f"bridge-{run_id}")


def publish(settings, device_id: str, messages: list[tuple[str, bytes]], timeout: float = 20.0) -> None:
    """Publish (MQTT topic, payload) pairs at QoS 1 as ``device_id`` (with a new password) and wait
    for the broker's acknowledgements."""
    password = device_credentials(settings, [device_id])[device_id]
    client = mqtt_client(settings, device_id, Account(device_id, password))
    try:
        sent = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in sent:
            info.wait_for_publish(timeout)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.timeout(300)
def test_a_payload_naming_another_device_than_its_topic_is_rejected_as_identity_mismatch(
        settings, start_worker, run_id, tmp_path):
    spoofer, victim = f"spoofer-{run_id}", f"victim-{run_id}"
    asyncio.run(register(settings, [spoofer, victim]))
    worker = start_worker()
    worker.wait_ready()
    worker.wait_registered([spoofer, victim])
    client_id = f"bridge-{run_id}"
    bridge = start_bridge(settings, tmp_path, client_id)
    try:
        wait_for_log(tmp_path / f"bridge-{client_id}.log", "mqtt_connected")
        forged = [telemetry(victim, seq) for seq in range(5)]
        honest = [telemetry(spoofer, seq) for seq in range(5, 8)]
        publish(settings, spoofer, [(f"devices/{spoofer}/telemetry", p) for p in forged + honest])

        # The honest messages are stored; the forged ones never are, under either id.
        assert wait_for(lambda: asyncio.run(stored_messages(settings, spoofer))[1] == 3, timeout=60)
        mismatched = wait_for(lambda: [r for r in asyncio.run(dlq_messages(settings))
                                       if dict(r.headers)["iotflow-error"] == b"identity_mismatch"] or None,
                              timeout=60)
        assert mismatched and sorted(r.value for r in mismatched) == sorted(forged)  # the original bytes
        assert {r.key for r in mismatched} == {spoofer.encode()}  # who sent them
        headers = dict(mismatched[0].headers)
        assert headers["iotflow-field"] == b"device_id" and victim.encode() in headers["iotflow-reason"]
        assert asyncio.run(stored_messages(settings, victim)) == (0, 0)
        status, account = http_get_json(f"{worker.url}/api/v1/pipeline/accounting/devices/{spoofer}",
                                        headers=worker.bearer())
        assert status == 200 and (account["rejected"], account["accepted"]) == (5, 3), account
    finally:
        bridge.terminate()
        bridge.wait(timeout=30)
        forget_mqtt_session(settings, client_id)
