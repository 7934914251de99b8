"""SIGTERM under HTTP and ingest load (R-17): the worker turns unready, keeps answering while load
balancers take it out, finishes what is in flight, makes its batch durable, commits and exits 0 —
no failed request, no lost message, nothing left to replay."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiokafka import AIOKafkaProducer

from iotflow import topics
from iotflow.testing import committed_offsets, http_json, register, stored_messages, telemetry, wait_for

DRAIN_S = 3.0


class Producer(threading.Thread):
    """Telemetry at a steady pace until stopped; counts what Kafka acknowledged."""

    def __init__(self, settings, devices: list[str]) -> None:
        super().__init__(daemon=True)
        self.settings, self.devices = settings, devices
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        asyncio.run(self._produce())

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        topic = topics.name(self.settings, topics.SENSOR_DATA)
        seq = 0
        try:
            while not self.stop.is_set():
                futures = [await producer.send(topic, telemetry(d, seq), key=d.encode()) for d in self.devices]
                await asyncio.gather(*futures)
                self.sent += len(futures)
                seq += 1
                await asyncio.sleep(0.02)
        finally:
            await producer.stop()


class Balancer(threading.Thread):
    """A load balancer and its clients: requests go to the worker while its readiness says so."""

    def __init__(self, worker, devices: list[str]) -> None:
        super().__init__(daemon=True)
        self.worker, self.devices = worker, devices
        self.stop = threading.Event()
        self.routed = True
        self.draining_seen: float | None = None
        self.answered = 0
        self.failures: list[object] = []

    def run(self) -> None:
        viewer = self.worker.bearer()
        clients = [threading.Thread(target=self._client, args=(viewer, i), daemon=True) for i in range(4)]
        for client in clients:
            client.start()
        while not self.stop.is_set() and self.routed:
            try:
                status, _, body = http_json("GET", f"{self.worker.url}/health/ready", timeout=2)
            except OSError:
                status, body = 0, {}
            if status == 503:
                self.routed = False  # out of rotation: no new requests
                self.draining_seen = time.monotonic()
                self.draining_body = body
            time.sleep(0.1)
        for client in clients:
            client.join(timeout=30)

    def _client(self, viewer: dict, index: int) -> None:
        while self.routed and not self.stop.is_set():
            device = self.devices[(self.answered + index) % len(self.devices)]
            try:
                status, _, body = http_json("GET", f"{self.worker.url}/api/v1/devices/{device}/state",
                                            headers=viewer, timeout=10)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if status == 200:
                self.answered += 1
            else:
                self.failures.append((status, body))


@pytest.mark.timeout(600)
def test_sigterm_under_load_fails_no_request_and_loses_no_message(settings, start_worker, run_id, chaos):
    devices = [f"term-{run_id}-{i}" for i in range(10)]
    asyncio.run(register(settings, devices))
    env = {"IOTFLOW_SHUTDOWN_DRAIN_S": str(DRAIN_S)}
    worker = start_worker(**env)
    worker.wait_ready()
    worker.wait_registered(devices)
    # A load balancer puts a worker in rotation once its readiness says so.
    assert wait_for(lambda: http_json("GET", f"{worker.url}/health/ready")[0] == 200, timeout=60)

    producer = Producer(settings, devices)
    producer.start()
    balancer = Balancer(worker, devices)
    balancer.start()
    assert wait_for(lambda: asyncio.run(stored_messages(settings, f"term-{run_id}-"))[1] > 500, timeout=120)
    answered_before = balancer.answered
    assert answered_before > 0

    signalled = time.monotonic()
    worker.proc.terminate()  # SIGTERM
    assert wait_for(lambda: balancer.draining_seen is not None, timeout=5), "readiness never said draining"
    assert balancer.draining_body["status"] == "draining"
    assert balancer.draining_seen - signalled < 1.5
    exit_code = worker.proc.wait(timeout=DRAIN_S + 30)
    stopped_after = time.monotonic() - signalled
    balancer.stop.set()
    balancer.join(timeout=30)
    producer.stop.set()
    producer.join(timeout=30)

    assert exit_code == 0, worker.log_text()[-3000:]
    assert DRAIN_S <= stopped_after < DRAIN_S + 30
    assert balancer.failures == [], balancer.failures[:5]
    assert balancer.answered > answered_before  # it kept answering while draining
    # Flushed and committed: what the worker committed is exactly what it stored — the next
    # owner has nothing to replay.
    stored = asyncio.run(stored_messages(settings, f"term-{run_id}-"))[1]
    assert sum(asyncio.run(committed_offsets(settings)).values()) == stored

    # The rest (produced while it stopped) is taken by the next worker: nothing lost.
    after = start_worker(IOTFLOW_WEB_PORT=str(worker.web_port), **env)
    after.wait_ready()
    assert wait_for(lambda: asyncio.run(stored_messages(settings, f"term-{run_id}-"))[1] == producer.sent,
                    timeout=180), f"stored {asyncio.run(stored_messages(settings, f'term-{run_id}-'))} of {producer.sent}"
    rows, messages = asyncio.run(stored_messages(settings, f"term-{run_id}-"))
    chaos(fault="worker SIGTERM under HTTP and ingest load", sent=producer.sent, stored=messages,
          lost=producer.sent - messages, duplicated=rows // 2 - messages, requests=balancer.answered + len(balancer.failures),
          failed_requests=len(balancer.failures), recovery_s=round(stopped_after, 1))
    assert (rows, messages) == (2 * producer.sent, producer.sent)
