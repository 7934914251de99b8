"""Fixtures for tests against the real local stack that `make test` starts."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from iotflow.kafka_admin import ensure_topics
from iotflow.settings import Settings
from iotflow.stack import services
from iotflow.testing import WorkerProcess, free_port
from iotflow.topics import SENSOR_DATA


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> Settings:
    """The settings of the running local stack; fails (never skips) when it is down."""
    settings = Settings.from_env()
    down = [s.name for s in (svc.status() for svc in services(settings).values()) if not s.up]
    if down:
        pytest.fail(f"the local stack is not up ({', '.join(down)}): `make test` starts it before the tests")
    asyncio.run(ensure_topics(settings))
    return settings


@pytest.fixture
def run_id() -> str:
    """A short id that keeps this test's devices, groups and tables apart from every other run."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def start_worker(stack: Settings, tmp_path: Path, run_id: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start a worker of this test's app (same app id = same consumer group and tables)."""
    started: list[WorkerProcess] = []

    def start(*, fresh_state: bool = False, **overrides: str) -> WorkerProcess:
        port = overrides.pop("IOTFLOW_WEB_PORT", None) or str(free_port())
        state = tmp_path / (f"worker-{port}-{uuid.uuid4().hex[:6]}" if fresh_state else f"worker-{port}")
        env = {
            "IOTFLOW_APP_ID": f"iotflow-test-{run_id}",
            "IOTFLOW_WEB_PORT": port,
            "IOTFLOW_DATA_DIR": str(state),
            **overrides,
        }
        worker = WorkerProcess(env, tmp_path / f"worker-{port}.log").start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.__exit__(None, None, None)


def telemetry(device_id: str, seq: int) -> bytes:
    return json.dumps({"device_id": device_id, "msg_id": f"{device_id}-{seq}", "seq": seq,
                       "ts": 1_700_000_000_000 + seq, "metrics": {"temp": 20.5}}).encode()


async def produce_telemetry(settings: Settings, devices: list[str], per_device: int) -> int:
    """Send ``per_device`` messages for each device, keyed by device id, acks=all; return the count."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for seq in range(per_device):
            for device_id in devices:
                await producer.send(SENSOR_DATA, telemetry(device_id, seq), key=device_id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return len(devices) * per_device
