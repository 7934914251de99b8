"""A full batch is written behind the agent's back while the next is decided: two batches at most in
the writing, their rows at once, their table writes in batch order, batches acknowledged in order,
nothing acknowledged before its rows and table writes are done, and flush() returns only when
everything decided is."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from iotflow.dedup import DeviceAccount, LatestValues, Mark
from iotflow.devices import DeviceStatus
from iotflow.ingest import IngestPipeline
from iotflow.parking import ParkingLot
from iotflow.tables.batched import TableBatch, _Acked
from iotflow.telemetry import Limits


class HeldSink:
    """Each write waits until the test lets that very write through (``release(n)``, 0-based)."""

    def __init__(self) -> None:
        self.writes: list[list[tuple]] = []
        self._gates: dict[int, asyncio.Event] = {}

    def _gate(self, n: int) -> asyncio.Event:
        return self._gates.setdefault(n, asyncio.Event())

    def release(self, n: int) -> None:
        self._gate(n).set()

    async def write(self, rows):
        n = len(self.writes)
        self.writes.append(list(rows))
        await self._gate(n).wait()
        return len(rows)


class Batches(TableBatch):
    """The real TableBatch on a plain dict: its changelog writes are recorded, not produced."""

    def __init__(self, name: str, log: list[str], codec) -> None:
        table = SimpleNamespace(data=SimpleNamespace(data={}), apply_changelog_batch=self._apply,
                                changelog_topic=SimpleNamespace(get_topic_name=lambda: f"{name}-changelog"))
        super().__init__(None, table, codec)  # type: ignore[arg-type]
        self.name, self.log = name, log

    @property
    def stored(self) -> dict[bytes, bytes]:
        return self.table.data.data

    async def _produce(self, batch):
        self.log.append(f"{self.name}:{len(batch)}")
        return [_Acked(partition, 0, [(key, value)]) for key, (partition, value) in batch.items()]

    def _apply(self, records) -> None:
        for record in records:
            if record.value is None:
                self.stored.pop(record.key, None)
            else:
                self.stored[record.key] = record.value


def telemetry(seq: int) -> bytes:
    return json.dumps({"device_id": "d1", "msg_id": f"m{seq}", "seq": seq,
                       "ts": "2026-11-30T12:00:00Z", "metrics": {"t": 1.0}}).encode()


def rig(batch_size: int = 2):
    log: list[str] = []
    acked: list[int] = []
    sink = HeldSink()
    marks, accounts, latest = (Batches("marks", log, Mark), Batches("accounts", log, DeviceAccount),
                               Batches("latest", log, LatestValues))
    pipeline = IngestPipeline(sink=sink, dlq=None, marks=marks, accounts=accounts, latest=latest,  # type: ignore[arg-type]
                              device_status=lambda _p, _k: DeviceStatus.REGISTERED,
                              parked=ParkingLot(wait_s=30, max_messages=10),
                              ack=lambda messages: acked.extend(m.offset for m in messages), limits=Limits(),
                              batch_size=batch_size, dedup_window_s=3600, clock=lambda: 1_796_040_000.0)
    pipeline._indexed = True

    def message(offset: int, value: bytes | None = None) -> SimpleNamespace:
        return SimpleNamespace(partition=0, offset=offset, key=b"d1", value=value or telemetry(offset),
                               timestamp=float(offset), topic="s")

    return pipeline, sink, (marks, accounts, latest), log, acked, message


async def until(condition, timeout: float = 2.0) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0)
    await asyncio.wait_for(wait(), timeout)


def test_the_next_batches_are_decided_while_full_ones_are_written_and_acks_come_in_order():
    async def scenario() -> None:
        pipeline, sink, (marks, accounts, _), log, acked, message = rig()
        await asyncio.wait_for(pipeline.handle(message(0)), 1)
        await asyncio.wait_for(pipeline.handle(message(1)), 1)  # full: batch A, handed to a write of its own
        await until(lambda: len(sink.writes) == 1)
        # A's table writes go out while its rows wait on the database (a mark ahead of its rows is
        # harmless: it carries its message's offset, and a replay of that offset is written again).
        await until(lambda: log == ["marks:2", "accounts:1", "latest:1"])
        # The agent goes on meanwhile. A replay of offset 1's message is a duplicate: the batch in
        # the writing is read.
        await asyncio.wait_for(pipeline.handle(message(2)), 1)
        await asyncio.wait_for(pipeline.handle(message(3, telemetry(1))), 1)
        await asyncio.wait_for(pipeline.handle(message(4)), 1)  # full: batch B
        # B's rows go to the database at once, beside A's; its table writes wait until A is written.
        await until(lambda: len(sink.writes) == 2)
        assert [row[5] for row in sink.writes[1]] == [2, 4]
        await asyncio.wait_for(pipeline.handle(message(5)), 1)
        # A third full batch waits for the oldest before it is handed over.
        fills = asyncio.ensure_future(pipeline.handle(message(6)))
        await asyncio.sleep(0.05)
        assert not fills.done() and len(sink.writes) == 2
        assert acked == [] and len(log) == 3
        sink.release(1)  # B's rows are stored first: B is still acknowledged after A
        await asyncio.sleep(0.05)
        assert acked == [] and len(log) == 3 and not fills.done()
        sink.release(0)
        await until(lambda: acked == [0, 1, 2, 3, 4])
        assert log[3:6] == ["marks:2", "accounts:1", "latest:1"]  # B: m2 and m4 (m1 again is a duplicate)
        await asyncio.wait_for(fills, 1)
        await until(lambda: len(sink.writes) == 3)
        flushed = asyncio.ensure_future(pipeline.flush())
        await asyncio.sleep(0.05)
        assert not flushed.done() and acked == [0, 1, 2, 3, 4]
        sink.release(2)
        await asyncio.wait_for(flushed, 1)
        assert acked == [0, 1, 2, 3, 4, 5, 6]
        assert [row[5] for write in sink.writes for row in write] == [0, 1, 2, 4, 5, 6]
        assert DeviceAccount.decode(accounts.stored[b"d1"]).duplicates == 1
        assert len(marks.stored) == 6  # m0, m1, m2, m4, m5, m6

    asyncio.run(scenario())


def test_a_write_that_fails_is_raised_to_the_agent_and_nothing_after_it_is_acknowledged():
    async def scenario() -> None:
        pipeline, sink, _, _, acked, message = rig()

        async def broken(rows):
            raise RuntimeError("disk on fire")
        sink.write = broken
        # Raised at the latest when a batch waits for it: the third full batch, with two in the writing.
        raised = None
        for offset in range(6):
            try:
                await pipeline.handle(message(offset))
            except RuntimeError as exc:
                raised = offset, str(exc)
                break
        assert raised is not None and raised[1] == "disk on fire", "the failed write was not raised"
        try:
            await pipeline.flush()
        except RuntimeError:
            pass
        assert acked == []

    asyncio.run(scenario())


def test_flush_with_nothing_decided_returns_at_once():
    pipeline, *_ = rig()
    asyncio.run(asyncio.wait_for(pipeline.flush(), 1))


def test_a_fetch_reads_each_device_s_registry_status_once_and_the_next_fetch_reads_it_again():
    async def scenario() -> list[bytes]:
        pipeline, _, _, _, _, message = rig(batch_size=100)
        asked: list[bytes] = []

        def status(_partition: int, key: bytes) -> DeviceStatus:
            asked.append(key)
            return DeviceStatus.REGISTERED
        pipeline.device_status = status
        async with pipeline.deciding() as handle:
            for offset in range(3):
                await handle(message(offset))
        await pipeline.handle(message(3))  # a fetch of its own: the device may have changed meanwhile
        return asked

    assert asyncio.run(scenario()) == [b"d1", b"d1"]


def test_written_batches_are_let_go_however_few_rows_come():
    # Under light traffic no batch fills: every tick hands over a small one. The record of the
    # writes in flight must not keep them all (a worker runs for months).
    async def scenario() -> int:
        pipeline, sink, *_rest, message = rig(batch_size=1000)

        async def stored_at_once(rows):
            return len(rows)
        sink.write = stored_at_once
        for offset in range(200):
            await pipeline.handle(message(offset))
            await pipeline.tick()
        return len(pipeline._in_flight)

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) <= 2
