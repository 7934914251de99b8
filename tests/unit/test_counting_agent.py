from __future__ import annotations

import json
from pathlib import Path

import pytest

from iotflow.app import create_app
from iotflow.settings import Settings



@pytest.fixture
async def app(tmp_path: Path):
    # Built inside the test's running loop, so faust does not open (and leak) a loop of its own.
    app = create_app(Settings(store="memory", data_dir=tmp_path / "worker", app_id="iotflow-unit"))
    yield app
    # faust's aiokafka Consumer owns a thread with a loop of its own, created when a stream is
    # first iterated, even under agent.test_context(). Never started, it is never closed.
    consumer_thread = getattr(app._consumer, "_thread", None)
    if consumer_thread is not None and not consumer_thread.thread_loop.is_running():
        consumer_thread.thread_loop.close()


def telemetry(device_id: str, seq: int) -> bytes:
    return json.dumps({"device_id": device_id, "seq": seq}).encode()


async def test_the_agent_counts_messages_per_device(app):
    agent = app.agents["iotflow.count"]
    counts = app.tables["message-counts"]
    async with agent.test_context() as ctx:
        for seq in range(3):
            await ctx.put(key=b"dev-1", value=telemetry("dev-1", seq))
        await ctx.put(key=b"dev-2", value=telemetry("dev-2", 0))
    assert counts[b"dev-1"] == 3
    assert counts[b"dev-2"] == 1


async def test_a_bad_payload_is_skipped_and_the_agent_goes_on(app):
    agent = app.agents["iotflow.count"]
    counts = app.tables["message-counts"]
    async with agent.test_context() as ctx:
        await ctx.put(key=b"dev-1", value=b"\x00garbage")
        await ctx.put(key=b"dev-1", value=telemetry("dev-1", 1))
    assert counts[b"dev-1"] == 1
