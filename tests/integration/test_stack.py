"""The local stack script against real processes: status, idempotent start, data kept across restarts."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from iotflow.settings import Settings
from iotflow.stack.base import free_loopback_port

IOTFLOW = Path(sys.executable).with_name("iotflow")


def iotflow(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(IOTFLOW), *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


def status_lines(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}


def test_status_says_every_service_is_up(stack: Settings):
    result = iotflow("stack", "status")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = status_lines(result)
    assert sorted(lines) == ["kafka", "mosquitto", "postgres", "redis"]
    assert all(fields[1] == "up" for fields in lines.values())


def test_up_when_everything_runs_changes_nothing(stack: Settings):
    before = status_lines(iotflow("stack", "status"))
    result = iotflow("stack", "up")
    assert result.returncode == 0, result.stderr
    assert status_lines(iotflow("stack", "status")) == before  # same pids: nothing restarted


@pytest.fixture
def second_stack(stack: Settings) -> Iterator[dict[str, str]]:
    """A PostgreSQL + Kafka pair of its own (own folder, own ports), torn down afterwards."""
    root = stack.stack_dir.resolve() / f"test-{uuid.uuid4().hex[:8]}"
    kafka_port = free_loopback_port(span=2)  # the broker's port and its controller's, port + 1
    pg_port = free_loopback_port()
    dsn = f"postgresql://keeper:keeper@127.0.0.1:{pg_port}/keeper"
    env = {
        "IOTFLOW_STACK_DIR": str(root),
        "IOTFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
        "IOTFLOW_PG_DSN": dsn,
        "IOTFLOW_TSDB_DSN": dsn,
    }
    # Share the resolved Kafka jars: resolving again is tested by nothing here and costs a minute.
    shared = stack.stack_dir.resolve() / "kafka"
    for dist in shared.glob("dist-*"):
        (root / "kafka").mkdir(parents=True, exist_ok=True)
        shutil.copytree(dist, root / "kafka" / dist.name)
    yield env
    iotflow("stack", "down", "kafka", "postgres", env=env)
    shutil.rmtree(root, ignore_errors=True)


async def _write(bootstrap: str, dsn: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("kept", 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait("kept", b"still here", partition=0)
    finally:
        await producer.stop()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        await conn.execute("INSERT INTO kept VALUES (1, 'still here')")
    finally:
        await conn.close()


async def _read(bootstrap: str, dsn: str) -> tuple[list[bytes], list[str]]:
    consumer = AIOKafkaConsumer("kept", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=10_000)
        messages = [m.value for msgs in batch.values() for m in msgs]
    finally:
        await consumer.stop()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        notes = [r["note"] for r in await conn.fetch("SELECT note FROM kept")]
    finally:
        await conn.close()
    return messages, notes


def test_stopping_and_starting_keeps_kafka_topics_and_postgres_rows(second_stack: dict[str, str]):
    env = second_stack
    up = iotflow("stack", "up", "postgres", "kafka", env=env)
    assert up.returncode == 0, up.stderr
    bootstrap, dsn = env["IOTFLOW_KAFKA_BOOTSTRAP"], env["IOTFLOW_PG_DSN"]
    asyncio.run(_write(bootstrap, dsn))

    down = iotflow("stack", "down", "postgres", "kafka", env=env)
    assert down.returncode == 0, down.stderr
    stopped = status_lines(iotflow("stack", "status", env=env))
    assert stopped["kafka"][1] == "down" and stopped["postgres"][1] == "down"

    up = iotflow("stack", "up", "postgres", "kafka", env=env)
    assert up.returncode == 0, up.stderr
    assert asyncio.run(_read(bootstrap, dsn)) == ([b"still here"], ["still here"])


def test_a_port_held_by_another_process_is_an_error_not_a_success(stack: Settings, tmp_path: Path):
    env = {"IOTFLOW_STACK_DIR": str(tmp_path / "stack"), "IOTFLOW_REDIS_URL": stack.redis_url.replace("/0", "/1")}
    # The shared stack's Redis holds that port; this stack's folder has no Redis of its own.
    result = iotflow("stack", "up", "redis", env=env)
    assert result.returncode == 1
    assert "already in use" in result.stderr
