"""Batched writes to a Faust table: one changelog record per key per batch, applied like recovery.

Assigning ``table[key] = value`` costs Faust a changelog record with its own future, callback,
sensor calls and a RocksDB write of the persisted offset when Kafka acknowledges it — for the
ingest agent, two of those per message were most of its time (docs/performance.md).
:class:`TableBatch` keeps a batch's writes in memory (so reads within the batch see them) and
:meth:`TableBatch.write` makes them durable in the order recovery would:

1. every key's latest value goes to the table's changelog topic, to the partition the caller
   named — the partition of the source message, as Faust's own table writes do: as one record
   batch per partition through the app's aiokafka producer, or record by record through Faust's
   transaction manager under ``exactly_once`` (it picks the transactional producer whose
   transaction commits with the source partition's offsets);
2. once Kafka has acknowledged them, they are applied to the local store as a standby or a
   restoring worker applies the same records, recording the changelog offset as persisted: on
   Faust's RocksDB store (rocksdict) as one write batch per partition that carries the persisted
   offset too (Faust's ``apply_changelog_batch`` writes it after the records, and would want a
   record object per changelog record), on any other store through ``apply_changelog_batch``.

So the local store never holds what the changelog does not, and a crash anywhere leaves state
that replaying the source topic repairs (the callers keep invariants 2 and 3 that way; see
iotflow/ingest.py). A value of ``None`` deletes the key (a tombstone).

Keys and values are bytes; the tables are declared with raw serializers (iotflow/tables/ingest.py).
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Generic, NamedTuple, Protocol, TypeVar

import faust
import rocksdict
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from faust.stores.base import SerializedStore
from faust.types.tuples import TP

from iotflow.backoff import full_jitter

log = structlog.get_logger(__name__)

V = TypeVar("V")

_Write = tuple[int, bytes | None]  # (partition, encoded value or None for a delete)


class _Acked(NamedTuple):
    """Changelog records Kafka acknowledged in one partition, at consecutive offsets from ``base``."""

    partition: int
    base: int
    records: list[tuple[bytes, bytes | None]]


class _Applied(NamedTuple):
    """A changelog record Kafka acknowledged, as ``apply_changelog_batch`` reads it — of an event
    and of its message alike (RocksDB's store reads ``event.message.tp/offset/key/value``, the
    memory store ``event.key/value`` and ``event.message.value/partition``)."""

    key: bytes
    value: bytes | None
    partition: int
    offset: int
    tp: TP

    @property
    def message(self) -> _Applied:
        return self


class Codec(Protocol[V]):
    def encode(self, value: V) -> bytes: ...
    def decode(self, value: bytes) -> V: ...


class TableBatch(Generic[V]):
    """One table's writes waiting for the next flush; values stay objects until the batch is taken."""

    def __init__(self, app: faust.App, table: faust.Table, codec: Codec[V]) -> None:
        self.app = app
        self.table = table
        self.codec = codec
        self._pending: dict[bytes, tuple[int, V | None]] = {}
        self._in_flight: dict[bytes, _Write] = {}

    def get(self, partition: int, key: bytes) -> V | None:
        """The value as the batches so far leave it, read from the table's ``partition``.

        A pending value is returned as the very object that was set, so a caller may update it in
        place and set it again.
        """
        pending = self._pending.get(key)
        if pending is not None:
            return pending[1]
        raw = self._in_flight[key][1] if key in self._in_flight else stored(self.table, partition, key)
        return None if raw is None else self.codec.decode(raw)

    def unwritten(self) -> list[tuple[bytes, V]]:
        """The values set but not yet in the local store (pending, or taken and being written);
        deletes left out."""
        decode = self.codec.decode
        found = [(key, value) for key, (_, value) in self._pending.items() if value is not None]
        found += [(key, decode(raw)) for key, (_, raw) in self._in_flight.items()
                  if raw is not None and key not in self._pending]
        return found

    @property
    def pending(self) -> int:
        """Keys set since the last :meth:`take`."""
        return len(self._pending)

    def set(self, partition: int, key: bytes, value: V) -> None:
        self._pending[key] = (partition, value)

    def delete(self, partition: int, key: bytes) -> None:
        self._pending[key] = (partition, None)

    def take(self) -> dict[bytes, _Write]:
        """Encode the pending writes as one batch; reads still see them until :meth:`write` is done."""
        encode = self.codec.encode
        batch = {key: (partition, None if value is None else encode(value))
                 for key, (partition, value) in self._pending.items()}
        self._pending = {}
        self._in_flight.update(batch)
        return batch

    async def write(self, batch: dict[bytes, _Write]) -> None:
        """Changelog first, local store second (see the module docstring).

        Raises what the producer raises; the batch then stays visible to :meth:`get` so that the
        caller can retry it without reads going back to older values.
        """
        if batch:
            apply_acknowledged(self.table, self.table.changelog_topic.get_topic_name(), await self._produce(batch))
        for key, write in batch.items():
            if self._in_flight.get(key) is write:
                del self._in_flight[key]

    async def _produce(self, batch: dict[bytes, _Write]) -> list[_Acked]:
        producer = await self.app.maybe_start_producer()
        topic = self.table.changelog_topic.get_topic_name()
        if not self.app.in_transaction:
            return await _send_batches(producer._ensure_producer(), topic, batch)
        # Faust's TransactionManager picks each record's transactional producer (the one whose
        # transaction commits with the source partition's offsets): record by record.
        futures = [await producer.send(topic, key, value, partition, None, None)
                   for key, (partition, value) in batch.items()]
        return [_Acked(meta.topic_partition.partition, meta.offset, [(key, value)])
                for (key, (_, value)), meta in zip(batch.items(), await asyncio.gather(*futures))]


def apply_acknowledged(table: faust.Table, topic: str, acked: list[_Acked]) -> None:
    """Apply changelog records Kafka acknowledged to ``table``'s local store (step 2 above)."""
    store = table.data
    if isinstance(store, SerializedStore) and getattr(store, "use_rocksdict", False):
        for run in acked:
            if run.records:
                store._db_for_partition(run.partition).write(rocksdb_write(run, store.offset_key))
        return
    table.apply_changelog_batch([_Applied(key, value, run.partition, run.base + place, TP(topic, run.partition))
                                 for run in acked for place, (key, value) in enumerate(run.records)])


def rocksdb_write(run: _Acked, offset_key: bytes) -> rocksdict.WriteBatch:
    """One partition's acknowledged records and their last offset as the persisted one, in one write
    (recovery and standbys read the changelog on from the persisted offset)."""
    batch = rocksdict.WriteBatch(raw_mode=True)
    for key, value in run.records:
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    batch.put(offset_key, str(run.base + len(run.records) - 1).encode())
    return batch


async def _send_batches(producer: AIOKafkaProducer, topic: str, batch: dict[bytes, _Write]) -> list[_Acked]:
    """Produce ``batch`` as one record batch per partition (more where one would pass the producer's
    batch size): aiokafka's ``send`` per record looks the topic's metadata up, makes a future and
    appends to its accumulator each time — a fifth of the ingest worker's time when every message
    wrote a changelog record (docs/performance.md). A record's offset is its batch's base offset
    plus its place in the batch."""
    by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
    for key, (partition, value) in batch.items():
        by_partition.setdefault(partition, []).append((key, value))
    sent: list[tuple[asyncio.Future, int, list[tuple[bytes, bytes | None]]]] = []
    for partition, records in by_partition.items():
        builder, held = producer.create_batch(), []
        for key, value in records:
            if builder.append(key=key, value=value, timestamp=None) is None:
                if held:  # full: send it, start the next
                    sent.append((await producer.send_batch(builder, topic, partition=partition), partition, held))
                    builder, held = producer.create_batch(), []
                if not held and builder.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a record of {topic} is larger than the producer's batch size")
            held.append((key, value))
        sent.append((await producer.send_batch(builder, topic, partition=partition), partition, held))
    return [_Acked(partition, (await future).offset, held) for future, partition, held in sent]


def stored(table: faust.Table, partition: int, key: bytes) -> bytes | None:
    """What the local store holds for ``key`` in ``partition`` (None: nothing).

    Read from the named partition, whatever event the caller is handling: Faust's RocksDB store
    reads the *current event's* partition (and only that one) when there is a current event, and
    ``table.get`` would look the key up twice and call the table's sensors on the way. The memory
    store keeps the bytes of every partition in one plain dict.
    """
    store = table.data
    if isinstance(store, SerializedStore):
        return store._db_for_partition(partition).get(key)
    return store.data.get(key)


def open_active_partitions(table: faust.Table) -> None:
    """Open the local store of every partition of ``table`` this worker owns as active.

    Faust's RocksDB store opens a partition's database when the rebalance assigns it, but its
    ``assign_partitions`` may stop half way (a next rebalance starting) and leave owned partitions
    unopened until an event of theirs arrives. Reads outside an event — ``table.get`` (which looks
    only in open databases) and ``table.items()`` (open active ones) — then miss every key of them:
    a settled owner answered 404 for registered devices after a rolling restart
    (tests/reliability/test_rebalances.py), and fleet totals would skip those partitions.
    """
    store = table.data
    if not isinstance(store, SerializedStore) or not hasattr(store, "_db_for_partition"):
        return  # the memory store keeps every partition in one dict
    topic = table.changelog_topic.get_topic_name()
    for tp in table.app.assignor.assigned_actives():
        if tp.topic == topic and tp.partition not in store._dbs:
            store._db_for_partition(tp.partition)


async def write_all(*writes: tuple[TableBatch, dict[bytes, _Write]]) -> None:
    """Write each table's batch (concurrently), retrying with jittered backoff while Kafka refuses:
    the caller acknowledges its events only after this returns."""
    for attempt in itertools.count():
        try:
            await asyncio.gather(*(table.write(batch) for table, batch in writes))
            return
        except KafkaError as exc:
            delay = full_jitter(attempt, base_s=0.2, cap_s=10.0)
            log.warning("table_write_retry", attempt=attempt + 1, error=repr(exc), retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)


async def warm_changelog_metadata(app: faust.App) -> None:
    """Load the producer's metadata of every table's changelog topic.

    Faust's ``table_route`` finds a key's owner through the producer's partitioner, which fails
    while the producer has never produced to the changelog (a fresh worker asked about a key
    before any write). Done once at start, after the subscription (Faust creates the changelog
    topics just before it), retried until the topics are visible.
    """
    await app.topics.wait_for_subscriptions()
    started = await app.maybe_start_producer()
    # Under exactly_once the app's producer is Faust's TransactionManager around the plain one,
    # whose aiokafka producer is what the router asks.
    producer = getattr(started, "producer", started)._ensure_producer()
    for table in app.tables.values():
        topic = table.changelog_topic.get_topic_name()
        for attempt in itertools.count():
            try:
                await asyncio.wait_for(producer.partitions_for(topic), 10)
                break
            except (KafkaError, asyncio.TimeoutError) as exc:
                log.warning("changelog_metadata_retry", topic=topic, error=repr(exc))
                await asyncio.sleep(full_jitter(attempt, base_s=0.2, cap_s=5.0))
