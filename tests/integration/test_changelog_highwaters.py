"""Where a changelog ends, as the table recovery reads it (iotflow.transport.ConsumerThread), on
the real Kafka: under exactly_once Faust took aiokafka's ``last_stable_offset`` — unknown before the
first fetch, which the recovery does not wait for — and restored nothing."""
from __future__ import annotations

import asyncio

import faust

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from iotflow.settings import Settings
from iotflow.testing import consumer_of
from iotflow.transport import ConsumerThread


async def _scenario(settings: Settings) -> tuple[object, dict, dict]:
    topic = f"{settings.topic_prefix}highwaters"  # this test's prefix: deleted with its topics
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    tp = TopicPartition(topic, 0)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, transactional_id=f"{topic}-tx")
    await producer.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_committed",
                                group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        async with producer.transaction():  # committed: offsets 0-4, its marker 5
            for i in range(5):
                await producer.send(topic, b"v", key=f"k{i}".encode())
        await producer.begin_transaction()  # still open: offsets 6-8
        for i in range(3):
            await producer.send_and_wait(topic, b"v", key=f"open{i}".encode())
        consumer.assign([tp])
        before_any_fetch = consumer.last_stable_offset(tp)  # what Faust asked
        thread = ConsumerThread.__new__(ConsumerThread)
        thread._consumer = consumer
        ends = await thread._highwaters([tp])
        await producer.abort_transaction()
        uncommitted = await _end(settings, tp)
    finally:
        await consumer.stop()
        await producer.stop()
    return before_any_fetch, ends, uncommitted


async def _end(settings: Settings, tp: TopicPartition) -> dict:
    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    await reader.start()
    try:
        return await reader.end_offsets([tp])
    finally:
        await reader.stop()


def test_recovery_reads_where_the_committed_changelog_ends_before_any_fetch(settings: Settings):
    loop = asyncio.new_event_loop()
    thread = consumer_of(faust.App("highwaters-test", loop=loop))._thread
    thread.thread_loop.close()  # never started here
    loop.close()
    assert type(thread) is ConsumerThread  # what the workers run
    before_any_fetch, ends, uncommitted = asyncio.run(_scenario(settings))
    assert before_any_fetch is None  # Faust's source: taken for an empty changelog
    # The end of what a read_committed reader may see: the committed records and their marker,
    # not the open transaction's records after them.
    assert list(ends.values()) == [6]
    assert list(uncommitted.values()) == [10]  # 9 records + the abort marker, read uncommitted
