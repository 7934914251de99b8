"""TableBatch's changelog writes without a transaction: one record batch per partition (split where
the producer's batch size is reached), and each record's offset its batch's base plus its place."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from rocksdict import Options, Rdict

from iotflow.tables.batched import _Acked, _send_batches, apply_acknowledged, rocksdb_write


class Builder:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.records = capacity, []

    def append(self, *, key, value, timestamp):
        if len(self.records) == self.capacity or (value and len(value) > 100):
            return None
        self.records.append((key, value))
        return object()


class Producer:
    """aiokafka's batch API as _send_batches uses it; partition p's log starts at offset 100·p."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.sent: list[tuple[int, list]] = []
        self.ends: dict[int, int] = {}

    def create_batch(self) -> Builder:
        return Builder(self.capacity)

    async def send_batch(self, builder, topic, *, partition):
        assert topic == "t-changelog"
        base = self.ends.setdefault(partition, 100 * partition)
        self.ends[partition] = base + len(builder.records)
        self.sent.append((partition, builder.records))
        future = asyncio.get_running_loop().create_future()
        future.set_result(type("Meta", (), {"offset": base})())
        return future


def test_records_go_in_one_batch_per_partition_and_get_consecutive_offsets():
    producer = Producer(capacity=10)
    batch = {b"a": (1, b"A"), b"b": (2, b"B"), b"c": (1, None), b"d": (1, b"D")}
    acked = asyncio.run(_send_batches(producer, "t-changelog", batch))
    assert producer.sent == [(1, [(b"a", b"A"), (b"c", None), (b"d", b"D")]), (2, [(b"b", b"B")])]
    assert acked == [(1, 100, [(b"a", b"A"), (b"c", None), (b"d", b"D")]), (2, 200, [(b"b", b"B")])]
    # Any store but Faust's RocksDB one is given a record per changelog record, at its own offset.
    table = SimpleNamespace(data=SimpleNamespace(data={}), apply_changelog_batch=lambda records: given.extend(records))
    given: list = []
    apply_acknowledged(table, "t-changelog", acked)  # type: ignore[arg-type]
    assert [(r.key, r.value, r.partition, r.offset, r.tp.topic, r.tp.partition) for r in given] == [
        (b"a", b"A", 1, 100, "t-changelog", 1), (b"c", None, 1, 101, "t-changelog", 1),
        (b"d", b"D", 1, 102, "t-changelog", 1), (b"b", b"B", 2, 200, "t-changelog", 2)]
    assert all(record.message is record for record in given)  # read as an event and as its message


def test_a_full_batch_is_sent_and_the_rest_goes_in_the_next():
    producer = Producer(capacity=2)
    batch = {bytes([k]): (0, b"v") for k in range(5)}
    acked = asyncio.run(_send_batches(producer, "t-changelog", batch))
    assert [len(records) for _, records in producer.sent] == [2, 2, 1]
    assert [(run.base, len(run.records)) for run in acked] == [(0, 2), (2, 2), (4, 1)]
    assert [key for run in acked for key, _ in run.records] == [bytes([k]) for k in range(5)]


def test_a_record_larger_than_a_batch_is_an_error_not_a_silent_drop():
    with pytest.raises(ValueError, match="larger than the producer's batch size"):
        asyncio.run(_send_batches(Producer(capacity=5), "t-changelog", {b"k": (0, b"x" * 101)}))


def test_on_rocksdb_the_records_and_their_last_offset_as_the_persisted_one_go_in_one_write(tmp_path):
    db = Rdict(str(tmp_path / "t-0.db"), options=Options(raw_mode=True))  # as Faust opens a table's partition
    try:
        db[b"gone"] = b"old"
        db.write(rocksdb_write(_Acked(0, 41, [(b"a", b"A"), (b"gone", None), (b"b", b"B")]), b"__offset__"))
        assert (db.get(b"a"), db.get(b"b"), db.get(b"gone")) == (b"A", b"B", None)
        assert db.get(b"__offset__") == b"43"  # what Faust's recovery reads on from
    finally:
        db.close()
