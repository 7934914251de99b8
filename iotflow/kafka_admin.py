"""Creating iotflow's topics with their partitions, replication and configs (idempotent)."""
from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from iotflow import topics
from iotflow.settings import Settings


async def ensure_topics(settings: Settings, names: tuple[str, ...] = topics.ALL) -> list[str]:
    """Create the topics in ``names`` that do not exist; return the ones created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=int(settings.kafka_request_timeout_s * 1000),
    )
    await asyncio.wait_for(admin.start(), settings.kafka_request_timeout_s)
    try:
        existing = set(await admin.list_topics())
        names = tuple(topics.name(settings, topic) for topic in names)
        wanted = [
            NewTopic(
                name,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.replication_factor,
                topic_configs=topics.topic_config(settings),
            )
            for name in names
            if name not in existing
        ]
        created = []
        for topic in wanted:
            try:
                await admin.create_topics([topic], timeout_ms=int(settings.kafka_request_timeout_s * 1000))
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass  # another process created it between list and create
        return created
    finally:
        await admin.close()
