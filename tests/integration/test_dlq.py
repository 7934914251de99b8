"""`iotflow dlq inspect|replay` against a real worker: telemetry of a device registered too late
sits in the DLQ as unknown_device; once the device exists, a replay stores it — once, however
often the replay runs."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iotflow.testing import produce, register, stored_messages, telemetry, wait_for

IOTFLOW = Path(sys.executable).with_name("iotflow")


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "IOTFLOW_TOPIC_PREFIX": settings.topic_prefix, "IOTFLOW_APP_ID": settings.app_id}
    done = subprocess.run([str(IOTFLOW), "dlq", *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.timeout(300)
def test_unknown_device_telemetry_is_inspected_then_replayed_once_the_device_exists(settings, start_worker, run_id):
    late = f"dlq-{run_id}"
    worker = start_worker(IOTFLOW_UNKNOWN_DEVICE_WAIT_S="2")
    worker.wait_ready()
    sent = [(late.encode(), telemetry(late, seq)) for seq in range(10)]
    asyncio.run(produce(settings, sent + [(late.encode(), b"{broken")]))

    def inspected() -> list[dict]:
        return [json.loads(line) for line in cli(settings, "inspect").stdout.splitlines()]

    assert wait_for(lambda: len(inspected()) == 11, timeout=60), inspected()
    records = inspected()
    unknown = [r for r in records if r["kind"] == "unknown_device"]
    assert sorted(r["value"].encode() for r in unknown) == sorted(v for _, v in sent)  # the original bytes
    assert all(r["field"] == "device_id" and r["source"]["topic"].endswith("sensor-data") for r in unknown)
    assert [r["value"] for r in records if r["kind"] == "invalid"] == ["{broken"]
    only_invalid = cli(settings, "inspect", "--kind", "invalid")
    assert len(only_invalid.stdout.splitlines()) == 1
    assert json.loads(only_invalid.stderr.strip().splitlines()[-1]) == {"records_by_kind": {"invalid": 1}}

    asyncio.run(register(settings, [late]))
    worker.wait_registered([late])
    dry = json.loads(cli(settings, "replay", "--kind", "unknown_device", "--dry-run").stdout)
    assert (dry["replayed"], dry["skipped_invalid"]) == (10, 1)
    assert asyncio.run(stored_messages(settings, late)) == (0, 0)  # a dry run sends nothing

    replayed = json.loads(cli(settings, "replay", "--kind", "unknown_device").stdout)
    assert replayed["replayed"] == 10
    assert wait_for(lambda: asyncio.run(stored_messages(settings, late)) == (20, 10), timeout=60)
    again = json.loads(cli(settings, "replay", "--kind", "unknown_device").stdout)
    assert again.get("replayed", 0) == 0  # progress was committed: nothing is sent twice
