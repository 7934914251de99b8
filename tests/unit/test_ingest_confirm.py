"""Waiting telemetry asks PostgreSQL about devices the registry table does not know yet
(IngestPipeline._confirm): its answer is used, and a registry that fails is not asked again for a
while, so the ingest agent does not spend a timeout on every round."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from iotflow.devices import DeviceStatus
from iotflow.errors import RegistryUnavailable
from iotflow.ingest import IngestPipeline
from iotflow.parking import ParkingLot
from iotflow.telemetry import Limits


def _pipeline(confirm) -> IngestPipeline:
    table = SimpleNamespace(table={})
    return IngestPipeline(sink=None, dlq=None, marks=table, accounts=table, latest=table,  # type: ignore[arg-type]
                          device_status=lambda _partition, _key: DeviceStatus.UNKNOWN,
                          parked=ParkingLot(wait_s=30, max_messages=10), ack=lambda _messages: None, confirm=confirm,
                          limits=Limits(), batch_size=10, dedup_window_s=60)


def test_the_registry_answer_is_used():
    async def confirm(keys):
        return {b"a": DeviceStatus.REGISTERED, b"b": DeviceStatus.DELETED}

    answer = asyncio.run(_pipeline(confirm)._confirm([b"a", b"b", b"c"]))
    assert answer == {b"a": DeviceStatus.REGISTERED, b"b": DeviceStatus.DELETED}  # c: still unknown


def test_a_failing_registry_is_left_alone_for_a_while():
    calls = []

    async def confirm(keys):
        calls.append(keys)
        raise RegistryUnavailable("the device registry's database is not answering")

    pipeline = _pipeline(confirm)

    async def twice():
        return await pipeline._confirm([b"a"]), await pipeline._confirm([b"a"])

    assert asyncio.run(twice()) == ({}, {})
    assert calls == [[b"a"]]  # the second round did not ask


def test_a_slow_registry_costs_one_timeout_then_is_left_alone(monkeypatch):
    monkeypatch.setattr("iotflow.ingest._CONFIRM_TIMEOUT_S", 0.05)
    calls = []

    async def confirm(keys):
        calls.append(keys)
        await asyncio.sleep(10)
        return {}

    pipeline = _pipeline(confirm)

    async def twice():
        return await pipeline._confirm([b"a"]), await pipeline._confirm([b"a"])

    assert asyncio.run(twice()) == ({}, {})
    assert len(calls) == 1
