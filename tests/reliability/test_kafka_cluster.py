"""One broker of a three-node Kafka cluster killed under load (R-10): topics with replication
factor 3 and ``min.insync.replicas=2``, producers with acks=all and idempotence, the worker's
group and changelogs on the same cluster. A SIGKILL of a node (a crashed host, leaders among its
partitions) costs a leader election and nothing else: every message is stored exactly once, and
the stored count stalls no longer than the election and the clients' metadata refresh."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from iotflow.kafka_admin import ensure_topics
from iotflow.stack import services
from iotflow.stack.kafka_cluster import KafkaCluster
from iotflow.testing import dlq_messages, produce, register, stored_messages, telemetry, wait_for

DEVICES = 20
PER_DEVICE = 1000
STALL_BOUND_S = 30  # the longest the stored count may stand still around the kill


@pytest.mark.timeout(900)
def test_a_broker_of_three_killed_under_load_loses_nothing_and_stalls_only_for_the_election(
        settings, start_worker, run_id, chaos):
    cluster = KafkaCluster(settings.stack_dir / "kafka-cluster" / run_id, services(settings)["kafka"]).start()
    worker = None
    try:
        own = dataclasses.replace(settings, kafka_bootstrap=cluster.bootstrap, replication_factor=3,
                                  min_insync_replicas=2)
        asyncio.run(ensure_topics(own))
        worker = start_worker(IOTFLOW_KAFKA_BOOTSTRAP=cluster.bootstrap, IOTFLOW_REPLICATION_FACTOR="3",
                              IOTFLOW_MIN_INSYNC_REPLICAS="2")
        worker.wait_ready(timeout=180)
        prefix = f"kc-{run_id}-"
        devices = [f"{prefix}{i}" for i in range(DEVICES)]
        asyncio.run(register(own, devices))
        worker.wait_registered(devices)

        def send() -> None:  # 20,000 messages in slices over ~40 s: the kill lands mid-stream
            for first in range(0, PER_DEVICE, 50):
                asyncio.run(produce(own, [(d.encode(), telemetry(d, seq)) for seq in range(first, first + 50)
                                          for d in devices]))
                time.sleep(1.0)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert wait_for(lambda: asyncio.run(stored_messages(own, prefix))[1] > 4000, timeout=180)
        progress: list[tuple[float, int]] = []
        cluster.kill(0)
        killed = time.monotonic()
        total = DEVICES * PER_DEVICE
        while time.monotonic() - killed < 300:
            stored = asyncio.run(stored_messages(own, prefix))[1]
            progress.append((time.monotonic(), stored))
            if stored == total and not sender.is_alive():
                break
            time.sleep(0.5)
        sender.join(timeout=10)
        rows, messages = asyncio.run(stored_messages(own, prefix))
        stall = longest_stall(progress, total)
        chaos(fault="one of three Kafka brokers kill -9 (RF 3, min ISR 2) under load", sent=total, stored=messages,
              lost=total - messages, duplicated=rows // 2 - messages, dlq=len(asyncio.run(dlq_messages(own))),
              recovery_s=round(progress[-1][0] - killed, 1), longest_stall_s=round(stall, 1))
        assert not sender.is_alive(), "the producer did not finish: acks=all with two of three brokers must go on"
        assert (rows, messages) == (2 * total, total)
        assert stall < STALL_BOUND_S, f"the stored count stood still {stall:.1f} s after the kill"
    finally:
        if worker is not None and worker.proc is not None:
            worker.kill()
        cluster.stop()


def longest_stall(progress: list[tuple[float, int]], total: int) -> float:
    """The longest time the count stood still before reaching ``total``, from (time, count) samples."""
    longest, since, last = 0.0, progress[0][0], progress[0][1]
    for at, count in progress[1:]:
        if count != last:
            longest, since, last = max(longest, at - since), at, count
        if count >= total:
            break
    else:
        longest = max(longest, progress[-1][0] - since)
    return longest
