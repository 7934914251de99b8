"""iotflow's topics on the broker: created with their partitions, replication and configs, and
checked against the settings (drift is reported, never "fixed" behind an operator's back)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from iotflow import topics
from iotflow.settings import Settings


@dataclass(frozen=True)
class Drift:
    topic: str
    what: str
    expected: str
    actual: str

    def line(self) -> str:
        return f"{self.topic}: {self.what} is {self.actual}, settings say {self.expected}"


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    return await _started_admin(settings.kafka_bootstrap, settings.kafka_request_timeout_s)


async def _started_admin(bootstrap: str, timeout_s: float) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(admin.start(), timeout_s)
    return admin


async def wait_visible(bootstrap: str, names: list[str], timeout_s: float) -> None:
    """Return once the brokers' metadata lists every topic in ``names`` (raises KafkaError after
    ``timeout_s``)."""
    admin = await _started_admin(bootstrap, timeout_s)
    try:
        await _wait_visible(admin, names, timeout_s)
    finally:
        await admin.close()


async def ensure_topics(settings: Settings, names: tuple[str, ...] = topics.ALL) -> list[str]:
    """Create the topics in ``names`` that do not exist; return the ones created."""
    admin = await _admin(settings)
    try:
        existing = set(await admin.list_topics())
        created = []
        for base in names:
            name = topics.name(settings, base)
            if name in existing:
                continue
            topic = NewTopic(
                name,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.replication_factor,
                topic_configs=topics.topic_config(settings, base),
            )
            response = await admin.create_topics([topic], timeout_ms=int(settings.kafka_request_timeout_s * 1000))
            # aiokafka returns per-topic error codes instead of raising them.
            for _, code, *rest in response.topic_errors:
                if code == TopicAlreadyExistsError.errno:
                    continue  # created by another process (or metadata lagged behind a create)
                if code:
                    raise KafkaError(f"creating topic {name}: error {code} {rest[0] if rest else ''}")
                created.append(name)
        await _wait_visible(admin, created, settings.kafka_request_timeout_s)
        return created
    finally:
        await admin.close()


async def _wait_visible(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """Return once the broker's metadata lists ``names``: a create is acknowledged by the controller
    a moment before brokers serve it, and producers or checks that follow must see the topic."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while names and not set(names) <= set(await admin.list_topics()):
        if asyncio.get_running_loop().time() > deadline:
            raise KafkaError(f"topics {names} created but not visible after {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def drift(settings: Settings, names: tuple[str, ...] = topics.ALL) -> list[Drift]:
    """How the existing topics differ from the settings: partitions, replicas and their configs."""
    admin = await _admin(settings)
    try:
        wanted = [topics.name(settings, topic) for topic in names]
        existing = set(await admin.list_topics())
        present = [name for name in wanted if name in existing]
        found = [Drift(name, "existence", "present", "missing") for name in wanted if name not in existing]
        if not present:
            return found
        for description in await admin.describe_topics(present):
            name, partitions = description["topic"], description["partitions"]
            if len(partitions) != settings.topic_partitions:
                found.append(Drift(name, "partitions", str(settings.topic_partitions), str(len(partitions))))
            replicas = {len(p["replicas"]) for p in partitions}
            if replicas != {settings.replication_factor}:
                actual = ",".join(str(r) for r in sorted(replicas))
                found.append(Drift(name, "replication factor", str(settings.replication_factor), actual))
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in present])
        for response in responses:
            for resource in response.to_object()["resources"]:
                wanted_config = topics.topic_config(settings, resource["resource_name"][len(settings.topic_prefix):])
                for entry in resource["config_entries"]:
                    if entry["config_names"] in wanted_config:
                        expected = wanted_config[entry["config_names"]]
                        if entry["config_value"] != expected:
                            found.append(Drift(resource["resource_name"], entry["config_names"], expected,
                                               str(entry["config_value"])))
        return found
    finally:
        await admin.close()


async def delete_topics_with_prefix(settings: Settings, *prefixes: str) -> list[str]:
    """Delete every topic whose name starts with one of ``prefixes`` (a test's own topics and its
    app's changelogs); returns their names."""
    admin = await _admin(settings)
    try:
        doomed = sorted(t for t in await admin.list_topics() if t.startswith(prefixes))
        if doomed:
            await admin.delete_topics(doomed, timeout_ms=int(settings.kafka_request_timeout_s * 1000))
        return doomed
    finally:
        await admin.close()
