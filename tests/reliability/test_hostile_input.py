"""The malformed-input storm (issue 7, scenario 9): 10,000 hostile payloads — 5,000 over MQTT, 5,000
over HTTP — while a fleet sends valid telemetry through the same bridge and worker. Every hostile
MQTT payload ends in the DLQ with its original bytes; every hostile HTTP request is refused with a
4xx that names each bad item; nothing hostile is stored; nothing crashes; the valid traffic is
stored exactly once, as if the storm had not happened."""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest

from iotflow import topics
from iotflow.fuzz import hostile_payloads
from iotflow.mqtt_auth import Account
from iotflow.simulator import FleetConfig
from iotflow.testing import (device_credentials, http_json, mqtt_client, register, stored_messages, topic_messages,
                             wait_for)
from tests.integration.test_mqtt_path import FleetThroughBridge

PER_PATH = 5000
BATCH = 100


def _publish_all(settings, payloads: list[tuple[str, str, bytes]]) -> None:
    """Every payload on its device's telemetry topic at QoS 1, each device through its own MQTT
    account (a hostile device can only publish on its own topics), until the broker acknowledged each."""
    by_device: dict[str, list[bytes]] = {}
    for device, _, raw in payloads:
        by_device.setdefault(device, []).append(raw)
    passwords = device_credentials(settings, by_device)
    clients = []
    try:
        sent = []
        for device, raws in by_device.items():
            client = mqtt_client(settings, device, Account(device, passwords[device]), max_inflight=500)
            clients.append(client)
            sent += [client.publish(f"devices/{device}/telemetry", raw, qos=1) for raw in raws]
        deadline = time.monotonic() + 120
        for info in sent:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        assert all(info.is_published() for info in sent), "the broker did not acknowledge every hostile payload"
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()


def _post_all(url: str, headers: dict[str, str], payloads: list[tuple[str, str, bytes]]) -> Counter:
    """The hostile payloads to ``POST /api/v1/ingest``: JSON ones in arrays of ``BATCH`` (each
    answer must name every item), the rest each in a body of its own. Returns the statuses."""
    statuses: Counter = Counter()
    documents, others = [], []
    for _, _, raw in payloads:
        try:
            json.loads(raw)
            documents.append(raw)
        except (ValueError, RecursionError):  # not JSON (or too deep for Python's parser: sent alone)
            others.append(raw)
    for start in range(0, len(documents), BATCH):
        batch = documents[start:start + BATCH]
        status, _, body = http_json("POST", url, b"[" + b",".join(batch) + b"]", headers=headers, timeout=30)
        statuses[status] += 1
        if status == 422:
            assert sorted(e["index"] for e in body["errors"]) == list(range(len(batch))), body
            assert all(e["field"] and e["reason"] for e in body["errors"]), body
    for raw in others:
        status, _, body = http_json("POST", url, b"[" + raw + b"]", headers=headers, timeout=30)
        statuses[status] += 1
    # And bodies that are not an array of payloads at all.
    for garbage in (b"", b"{}", b"null", b"[]", b"\xff\xfe", b"[" * 10_000, b"[" + b"{}," * 1000 + b"{}]"):
        status, _, _ = http_json("POST", url, garbage, headers=headers, timeout=30)
        statuses[status] += 1
    return statuses


@pytest.mark.timeout(900)
def test_a_storm_of_hostile_payloads_ends_in_the_dlq_or_a_4xx_and_valid_traffic_is_untouched(
    settings, start_worker, run_id, tmp_path, chaos
):
    hostile = [f"hx{run_id}-{i}" for i in range(10)]
    asyncio.run(register(settings, hostile))
    run = FleetThroughBridge(settings, start_worker, run_id, tmp_path,
                             FleetConfig(devices=10, messages_per_device=500, rate_per_device=25.0, seed=13,
                                         prefix=f"hv{run_id}"))
    try:
        run.worker.wait_registered(hostile)
        now_ms = int(time.time() * 1000)
        over_mqtt = hostile_payloads(hostile, PER_PATH, seed=1, now_ms=now_ms)
        over_http = hostile_payloads(hostile, PER_PATH, seed=2, now_ms=now_ms, first=PER_PATH)
        _publish_all(settings, over_mqtt)
        statuses = _post_all(f"{run.worker.url}/api/v1/ingest", run.worker.bearer("operator"), over_http)
        requests = sum(statuses.values())
        assert all(400 <= status < 500 for status in statuses), statuses  # refused, never a 5xx, never a 202

        run.sender.join(timeout=300)
        sent = run.result["totals"]["sent"]
        assert sent == 5000
        assert wait_for(lambda: run.stored() == sent, timeout=300), f"stored {run.stored()} of {sent}"
        rows, messages = asyncio.run(stored_messages(settings, run.prefix))
        assert (rows, messages) == (2 * sent, sent)
        assert asyncio.run(stored_messages(settings, f"hx{run_id}-")) == (0, 0)  # nothing hostile stored

        # Every hostile MQTT payload is in the DLQ, byte for byte, with the field it broke.
        expected = Counter(raw for _, _, raw in over_mqtt)

        def missing() -> int:
            found = Counter((m.value or b"") for m in asyncio.run(topic_messages(settings, topics.SENSOR_DATA_DLQ))
                            if (m.key or b"").decode().startswith(f"hx{run_id}-"))
            return sum((expected - found).values())
        assert wait_for(lambda: missing() == 0, timeout=180), f"{missing()} hostile payloads are not in the DLQ"
        run.worker.assert_running("under hostile input")
        assert run.bridge.poll() is None
        assert http_json("GET", f"{run.worker.url}/health/ready")[0] == 200
        chaos(fault=f"{2 * PER_PATH} hostile payloads (MQTT → DLQ, HTTP → {dict(sorted(statuses.items()))})",
              sent=sent, stored=messages, lost=sent - messages, duplicated=rows // 2 - messages,
              requests=requests, failed_requests=sum(n for s, n in statuses.items() if s >= 500))
    finally:
        run.stop()
