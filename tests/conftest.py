"""Fixtures for tests against the real local stack that `make test` starts (integration, reliability)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from iotflow.kafka_admin import delete_topics_with_prefix, ensure_topics
from iotflow.migrate import migrator
from iotflow.settings import Settings
from iotflow.stack import services
from iotflow.stack.base import free_loopback_port
from iotflow.testing import WorkerProcess, dlq_messages


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if "tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        elif "tests/reliability/" in path:
            item.add_marker(pytest.mark.reliability)


# Every test client signs as one subject, and many tests write through the API faster than a
# production client may: their workers lift the per-subject write limit, which
# tests/integration/test_api_limits.py proves with a worker of its own.
UNLIMITED_WRITES = {"IOTFLOW_API_WRITE_RATE_PER_S": "100000", "IOTFLOW_API_WRITE_BURST": "100000"}


@pytest.fixture(scope="session")
def stack() -> Settings:
    """The settings of the running local stack; fails (never skips) when it is down."""
    settings = Settings.from_env()
    down = [s.name for s in (svc.status() for svc in services(settings).values()) if not s.up]
    if down:
        pytest.fail(f"the local stack is not up ({', '.join(down)}): `make test` starts it before the tests")
    asyncio.run(migrator(settings).up())
    return settings


@pytest.fixture
def scratch_db(stack: Settings) -> Iterator[Settings]:
    """A database of its own, so rolling down does not pull the table from under other tests."""
    name = f"migrate_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(stack.tsdb_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def drop() -> None:
        # FORCE ends this role's sessions; an autovacuum worker (the server's own) on the database
        # cannot be ended by it and refuses the drop until it finishes, within seconds.
        for _ in range(60):
            try:
                return await admin(f"DROP DATABASE {name} WITH (FORCE)")
            except asyncpg.InsufficientPrivilegeError:
                await asyncio.sleep(0.5)
        await admin(f"DROP DATABASE {name} WITH (FORCE)")

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    dsn = stack.tsdb_dsn.rsplit("/", 1)[0] + f"/{name}"
    yield dataclasses.replace(stack, tsdb_dsn=dsn, pg_dsn=dsn)
    asyncio.run(drop())


@pytest.fixture
def run_id() -> str:
    """A short id that keeps this test's devices, groups and tables apart from every other run."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(stack: Settings, run_id: str) -> Iterator[Settings]:
    """The stack's settings with this test's own topics (created here, deleted after the test with
    its app's changelogs: a broker that kept every test's partitions would run out of files)."""
    own = dataclasses.replace(stack, topic_prefix=f"t{run_id}-", app_id=f"iotflow-test-{run_id}")
    asyncio.run(ensure_topics(own))
    yield own
    _delete_topics(own)


def _delete_topics(own: Settings) -> None:
    try:
        asyncio.run(delete_topics_with_prefix(own, own.topic_prefix, own.app_id))
    except Exception as exc:  # noqa: BLE001 - cleanup; the tests' results stand
        print(f"could not delete the topics of {own.app_id}: {exc!r}")


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start a worker of this test's app (same app id = same consumer group and tables)."""
    started: list[WorkerProcess] = []

    def start(*, fresh_state: bool = False, **overrides: str) -> WorkerProcess:
        port = overrides.pop("IOTFLOW_WEB_PORT", None) or str(free_loopback_port())
        state = tmp_path / (f"worker-{port}-{uuid.uuid4().hex[:6]}" if fresh_state else f"worker-{port}")
        env = {
            "IOTFLOW_APP_ID": settings.app_id,
            "IOTFLOW_TOPIC_PREFIX": settings.topic_prefix,
            "IOTFLOW_WEB_PORT": port,
            "IOTFLOW_DATA_DIR": str(state),
            **UNLIMITED_WRITES,
            **overrides,
        }
        worker = WorkerProcess(env, tmp_path / f"worker-{port}.log").start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.__exit__(None, None, None)


@pytest.fixture(scope="module")
def start_module_worker(stack: Settings, tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[Callable[[str], tuple[WorkerProcess, Settings]]]:
    """Factory: one ready worker for a module (its tests share it and keep to their own ids), with
    its own topics and app id; returns the worker and those settings."""
    started: list[WorkerProcess] = []

    def start(name: str) -> tuple[WorkerProcess, Settings]:
        run = uuid.uuid4().hex[:8]
        own = dataclasses.replace(stack, topic_prefix=f"t{run}-", app_id=f"iotflow-test-{run}")
        asyncio.run(ensure_topics(own))
        state = tmp_path_factory.mktemp(name)
        env = {"IOTFLOW_APP_ID": own.app_id, "IOTFLOW_TOPIC_PREFIX": own.topic_prefix,
               "IOTFLOW_WEB_PORT": str(free_loopback_port()), "IOTFLOW_DATA_DIR": str(state), **UNLIMITED_WRITES}
        worker = WorkerProcess(env, state / "worker.log").start()
        started.append(worker)
        worker.wait_ready()
        return worker, own

    yield start
    for worker in started:
        worker.__exit__(None, None, None)
    for worker in started:
        _delete_topics(dataclasses.replace(stack, topic_prefix=worker.env["IOTFLOW_TOPIC_PREFIX"],
                                           app_id=worker.env["IOTFLOW_APP_ID"]))


@pytest.fixture
def chaos(request: pytest.FixtureRequest, settings: Settings) -> Callable[..., None]:
    """Record a fault scenario's figures (messages sent, stored, lost, duplicated, in the DLQ; API
    requests and failures; recovery time) for `iotflow chaos`, which sets PYTEST_IOTFLOW_CHAOS_REPORT;
    a no-op otherwise. ``dlq`` defaults to the records in this test's DLQ topic (a scenario on Kafka
    brokers of its own counts its own)."""
    def record(**figures: object) -> None:
        path = os.environ.get("PYTEST_IOTFLOW_CHAOS_REPORT")
        if path:
            if "dlq" not in figures:
                try:
                    figures["dlq"] = len(asyncio.run(dlq_messages(settings)))
                except Exception as exc:  # noqa: BLE001 - a figure left blank, the scenario's verdict stands
                    print(f"could not count the DLQ of {settings.topic_prefix}: {exc!r}")
            with open(path, "a") as report:
                report.write(json.dumps({"test": request.node.nodeid, **figures}) + "\n")
    return record
