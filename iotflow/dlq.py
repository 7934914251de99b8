"""``iotflow dlq inspect|replay``: triage of ``sensor-data-dlq`` and replay of what can now be stored.

Every DLQ record keeps the device's original key and bytes, and in its headers why it is there
(``iotflow-error``: invalid, rejected, unknown_device, deleted_device, identity_mismatch; ``iotflow-field``,
``iotflow-reason``) and where it came from (source topic, partition, offset).

``inspect`` reads the DLQ from the beginning (nothing is committed) and yields one record per
message. ``replay`` sends the original key and bytes of the chosen kinds back to ``sensor-data``
(idempotent producer, acks=all) with an ``iotflow-replayed-from`` header, and commits its progress
in the consumer group ``<app id>-dlq-replay`` only after Kafka has acknowledged what it sent: a
second run goes on where the first stopped, and a replayed message the worker already stored is
a duplicate to it (dedup by msg_id), never a second row. Records of other kinds are skipped (and
passed by the committed offset).
"""
from __future__ import annotations

import base64
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from iotflow import topics
from iotflow.settings import Settings

KINDS = ("invalid", "rejected", "unknown_device", "deleted_device", "identity_mismatch")
REPLAYED_HEADER = "iotflow-replayed-from"
_IDLE_MS = 2000  # the DLQ is read up to its end: a poll that brings nothing for this long ends it


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, str]

    @property
    def kind(self) -> str:
        return self.headers.get("iotflow-error", "")

    def as_json(self) -> dict[str, object]:
        try:
            value: object = self.value.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            value, encoding = base64.b64encode(self.value).decode(), "base64"
        return {"partition": self.partition, "offset": self.offset, "key": (self.key or b"").decode(errors="replace"),
                "kind": self.kind, "field": self.headers.get("iotflow-field"),
                "reason": self.headers.get("iotflow-reason"),
                "source": {"topic": self.headers.get("iotflow-source-topic"),
                           "partition": _int(self.headers.get("iotflow-source-partition")),
                           "offset": _int(self.headers.get("iotflow-source-offset"))},
                "value": value, "value_encoding": encoding}


def _int(raw: str | None) -> int | None:
    return int(raw) if raw is not None and raw.isdigit() else None


async def _records(consumer: AIOKafkaConsumer) -> AsyncIterator[DeadLetter]:
    """Everything from the consumer's position to the end of the DLQ as it is now."""
    partitions = consumer.assignment()
    end = await consumer.end_offsets(list(partitions))
    while any([await consumer.position(tp) < end[tp] for tp in partitions]):
        batch = await consumer.getmany(timeout_ms=_IDLE_MS)
        if not batch:
            break
        for tp, messages in batch.items():
            for message in messages:
                if message.offset >= end[tp]:
                    continue
                headers = {k: v.decode(errors="replace") for k, v in message.headers or ()}
                yield DeadLetter(tp.partition, message.offset, message.key, message.value, headers)


def _consumer(settings: Settings, group: str | None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", request_timeout_ms=int(settings.kafka_request_timeout_s * 1000),
    )


async def _assign_all(consumer: AIOKafkaConsumer, topic: str) -> None:
    partitions = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
    consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # a fresh client knows no topics yet
    found = consumer.partitions_for_topic(topic)
    if not found:
        raise LookupError(f"topic {topic!r} does not exist (iotflow topics create)")
    return found


async def inspect(settings: Settings, *, kinds: tuple[str, ...] = ()) -> AsyncIterator[DeadLetter]:
    """The DLQ's records from the beginning (of ``kinds`` only, if given); commits nothing."""
    consumer = _consumer(settings, None)
    await consumer.start()
    try:
        await _assign_all(consumer, topics.name(settings, topics.SENSOR_DATA_DLQ))
        await consumer.seek_to_beginning()
        async for record in _records(consumer):
            if not kinds or record.kind in kinds:
                yield record
    finally:
        await consumer.stop()


async def replay(settings: Settings, *, kinds: tuple[str, ...], device: str | None = None,
                 dry_run: bool = False) -> Counter:
    """Send the DLQ's records of ``kinds`` (of one ``device``, if given) back to sensor-data; returns
    counts: ``replayed``, and ``skipped`` by reason."""
    dlq = topics.name(settings, topics.SENSOR_DATA_DLQ)
    counts: Counter = Counter()
    consumer = _consumer(settings, f"{settings.app_id}-dlq-replay")
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True,
                                request_timeout_ms=int(settings.kafka_request_timeout_s * 1000))
    await consumer.start()
    await producer.start()
    try:
        await _assign_all(consumer, dlq)
        pending, done = [], {}
        async for record in _records(consumer):
            done[TopicPartition(dlq, record.partition)] = record.offset + 1
            if record.kind not in kinds:
                counts[f"skipped_{record.kind or 'unknown'}"] += 1
                continue
            if device is not None and (record.key or b"").decode(errors="replace") != device:
                counts["skipped_other_device"] += 1
                continue
            counts["replayed"] += 1
            if not dry_run:
                pending.append(await producer.send(
                    topics.name(settings, topics.SENSOR_DATA), record.value, key=record.key,
                    headers=[(REPLAYED_HEADER, f"{dlq}/{record.partition}/{record.offset}".encode())]))
        if not dry_run:
            for sent in pending:
                await sent  # every record acknowledged by Kafka before the progress is committed
            if done:
                await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in done.items()})
    finally:
        await producer.stop()
        await consumer.stop()
    return counts
