"""A real worker against the real stack: counting, changelog recovery, scaling out, shutdown."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iotflow.testing import WorkerProcess, http_get_json
from tests.integration.conftest import produce_telemetry


def counts_via(worker: WorkerProcess, devices: list[str]) -> dict[str, int]:
    counts = {}
    for device_id in devices:
        status, body = http_get_json(f"{worker.url}/api/v1/ingest/counts/{device_id}")
        assert status == 200, body
        counts[device_id] = body["count"]
    return counts


def wait_for_counts(worker: WorkerProcess, expected: dict[str, int], timeout: float = 60.0) -> dict[str, int]:
    """Poll the worker until every device's count reaches its expected value (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = counts_via(worker, list(expected))
        if all(counts[d] >= n for d, n in expected.items()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


@pytest.fixture
def devices(run_id: str) -> list[str]:
    return [f"dev-{run_id}-{i}" for i in range(20)]


def test_liveness_answers_200(start_worker):
    worker = start_worker()
    worker.wait_ready()
    status, body = http_get_json(f"{worker.url}/health/live")
    assert (status, body["status"]) == (200, "ok")


def test_the_worker_counts_every_message_produced_exactly_once(stack, start_worker, devices):
    worker = start_worker()
    worker.wait_ready()
    sent = asyncio.run(produce_telemetry(stack, devices, per_device=100))
    counts = wait_for_counts(worker, {d: 100 for d in devices})
    assert counts == {d: 100 for d in devices}
    assert sum(counts.values()) == sent


def test_sigterm_stops_the_worker_with_exit_code_0_within_15_seconds(start_worker):
    worker = start_worker()
    worker.wait_ready()
    assert worker.terminate(timeout=15) == 0
    assert "Closing event loop" in worker.log_text()


def test_a_fresh_worker_restores_the_table_from_its_changelog(stack, start_worker, devices):
    first = start_worker()
    first.wait_ready()
    asyncio.run(produce_telemetry(stack, devices, per_device=50))
    assert wait_for_counts(first, {d: 50 for d in devices}) == {d: 50 for d in devices}
    assert first.terminate() == 0

    # Same app (consumer group, changelog), empty RocksDB folder: everything comes from Kafka.
    second = start_worker(fresh_state=True)
    second.wait_ready()
    assert counts_via(second, devices) == {d: 50 for d in devices}
    asyncio.run(produce_telemetry(stack, devices, per_device=10))
    assert wait_for_counts(second, {d: 60 for d in devices}) == {d: 60 for d in devices}


def test_two_workers_split_the_partitions_and_answer_for_each_other(stack, start_worker, devices):
    one = start_worker()
    one.wait_ready()
    two = start_worker()
    two.wait_ready()
    asyncio.run(produce_telemetry(stack, devices, per_device=30))
    expected = {d: 30 for d in devices}
    # Each device lives on one worker; @app.table_route forwards the request to its owner.
    assert wait_for_counts(one, expected) == expected
    assert counts_via(two, devices) == expected
    assert "partitions" in one.log_text() and "partitions" in two.log_text()


def test_an_exactly_once_worker_counts_through_kafka_transactions(stack, start_worker, devices):
    worker = start_worker(IOTFLOW_PROCESSING_GUARANTEE="exactly_once")
    worker.wait_ready()
    asyncio.run(produce_telemetry(stack, devices, per_device=20))
    assert wait_for_counts(worker, {d: 20 for d in devices}) == {d: 20 for d in devices}
    assert worker.terminate() == 0


def test_a_bad_setting_stops_the_worker_with_one_line_naming_it(tmp_path: Path):
    faust = Path(sys.executable).with_name("faust")
    done = subprocess.run(
        [str(faust), "-A", "iotflow", "worker", "-l", "info"],
        env={"PATH": "/usr/bin:/bin", "IOTFLOW_WEB_PORT": "abc"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == ["iotflow: expected a TCP port number (1-65535) for IOTFLOW_WEB_PORT (got 'abc')"]
