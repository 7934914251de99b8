"""Helpers for testing against a real iotflow worker, shipped for users' tests too.

:class:`WorkerProcess` runs ``faust -A iotflow worker`` as a child process with its own
settings, waits for it to be ready and stops it the way an operator would (SIGTERM) or the
way a crash would (SIGKILL). The coroutines below produce telemetry to Kafka and count what
arrived in the database and in the DLQ.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import asyncpg
import faust
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from iotflow import auth, topics
from iotflow.mqtt_auth import Account, DynamicSecurity, account, configure
from iotflow.registry import provision
from iotflow.settings import Settings
from iotflow.transport import Consumer, Transport

READY_LINE = "Worker ready"


def stack_service(action: str, service: str, timeout: float = 300) -> None:
    """``iotflow stack up|down SERVICE`` for a fault test; fails the test if the command fails."""
    done = subprocess.run([str(Path(sys.executable).with_name("iotflow")), "stack", action, service],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes (its last value)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            return result
        time.sleep(interval)
    return result


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def http_json(method: str, url: str, body: Any = None, *, headers: Mapping[str, str] | None = None,
              timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP request (``body`` sent as JSON unless it is bytes); the status, the response
    headers and the decoded JSON body (None when not JSON)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, answer, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, answer, json.loads(raw)
    except ValueError:
        return status, answer, None


def http_get_json(url: str, *, timeout: float = 5.0, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """GET ``url``; return the status and the decoded JSON body (None when not JSON)."""
    status, _, body = http_json("GET", url, timeout=timeout, headers=headers)
    return status, body


def bearer(settings: Settings, role: str = "viewer", subject: str = "iotflow-testing") -> dict[str, str]:
    """An ``Authorization`` header with a short-lived token that workers of ``settings`` accept."""
    token = auth.issue(settings.jwt_secret, role=role, subject=subject, ttl_s=3600, kid=settings.jwt_kid,
                       issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    return {"Authorization": f"Bearer {token}"}


class WorkerProcess:
    """One ``faust -A iotflow worker`` process with the given ``IOTFLOW_*`` overrides."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, cwd: Path | None = None,
                 app: str = "iotflow") -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.cwd = cwd
        self.app = app
        self.web_port = int(self.env.get("IOTFLOW_WEB_PORT", "6066"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def bearer(self, role: str = "viewer") -> dict[str, str]:
        """An ``Authorization`` header this worker accepts (its own settings' secret)."""
        return bearer(Settings.from_env(self.env), role)

    def start(self) -> WorkerProcess:
        faust = Path(sys.executable).with_name("faust")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(faust), "-A", self.app, "worker", "-l", "info"],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def log_text(self) -> str:
        """What this run of the worker has logged so far."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the worker has its partitions, recovered its tables and serves HTTP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if READY_LINE in self.log_text():
                try:
                    if http_get_json(f"{self.url}/health/live", timeout=2)[0] == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready within {timeout}s:\n{self.log_text()[-4000:]}")

    def wait_recovered(self, timeout: float = 300.0) -> None:
        """Wait until ``/health/ready`` answers 200: partitions assigned and every table restored
        from its changelog (``wait_ready`` only waits for the process to serve; a worker restoring
        a long changelog — all of it under exactly_once — reads its tables empty meanwhile)."""
        ready = wait_for(lambda: http_get_json(f"{self.url}/health/ready", timeout=5)[0] == 200, timeout=timeout)
        assert ready, f"worker not ready (tables recovered) within {timeout}s:\n{self.log_text()[-3000:]}"

    def assert_running(self, during: str) -> None:
        """Fail, with the end of the worker's log (where its crash is), if it has exited."""
        assert self.proc is not None, "worker not started"
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited with {self.proc.returncode} {during}; its log ends:\n"
                                 f"{self.log_text()[-3000:]}")

    def wait_registered(self, devices: list[str], timeout: float = 90.0) -> None:
        """Until this worker's registry table knows every device in ``devices`` (``/state`` answers)."""
        viewer = self.bearer()
        for device_id in devices:
            known = wait_for(lambda: http_get_json(f"{self.url}/api/v1/devices/{device_id}/state",
                                                   headers=viewer)[0] == 200, timeout=timeout)
            assert known, f"{device_id} did not reach the registry table within {timeout} s"

    def metric(self, series: str) -> float:
        """The sum of this worker's /metrics samples whose series starts with ``series`` (a name, or a
        name with its first labels: ``iotflow_device_events_total{outcome="applied"``)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(series) and line[len(series)] in " {,}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, as an operator or an orchestrator stops a worker (it drains first,
        ``IOTFLOW_SHUTDOWN_DRAIN_S``); return the exit code."""
        return self._stop(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: a crash at an arbitrary point."""
        return self._stop(signal.SIGKILL, 10.0)

    def _stop(self, sig: signal.Signals, timeout: float) -> int:
        assert self.proc is not None, "worker not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        elif self.proc.returncode > 0:
            # It died by itself: pytest shows this (captured) for a failing test, as the cause.
            print(f"worker on port {self.web_port} exited with {self.proc.returncode}; its log ends:\n"
                  f"{self.log_text()[-6000:]}")


def forget_mqtt_session(settings: Settings, client_id: str, timeout: float = 10.0) -> None:
    """End the persistent MQTT session of the bridge ``client_id`` for good: connect with its id and
    a clean session, then leave. A bridge stopped for good otherwise leaves its session subscribed to
    every device's telemetry on the broker, which queues all later traffic for it (up to
    ``max_queued_messages``) — on a shared test broker, hundreds of MB after a few dozen tests."""
    client = mqtt_client(settings, client_id, account(settings, "bridge"), timeout=timeout)
    client.disconnect()
    client.loop_stop()


def mqtt_client(settings: Settings, client_id: str, credentials: Account, *, timeout: float = 10.0,
                protocol: int = mqtt.MQTTv311, max_inflight: int = 20) -> mqtt.Client:
    """A paho client connected (clean session, network loop running) as ``credentials``; the
    caller disconnects it (its loop thread ends with the connection)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                         **({"clean_session": True} if protocol != mqtt.MQTTv5 else {}))
    client.max_inflight_messages_set(max_inflight)
    connected = threading.Event()
    refused: list[str] = []
    client.on_connect = lambda c, u, f, reason, p: refused.append(str(reason)) if reason.is_failure else connected.set()
    host, port = configure(client, settings, credentials)
    client.connect(host, port)
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise TimeoutError(f"could not connect to {settings.mqtt_url} as {credentials.username} ({client_id}) "
                           f"within {timeout} s{': ' + refused[0] if refused else ''}")
    return client


def forget_device_accounts(settings: Settings, device_ids: Iterable[str]) -> int:
    """Delete these devices' MQTT accounts: a test's fleet leaves the shared broker's account file
    as it found it (Mosquitto rewrites the whole file on each change, so its size is every later
    test's cost)."""
    with DynamicSecurity(settings, timeout_s=60.0) as control:
        return control.delete(device_ids)


def device_credentials(settings: Settings, device_ids: Iterable[str]) -> dict[str, str]:
    """New MQTT passwords for ``device_ids`` (accounts created where missing), as an admin issues them."""
    with DynamicSecurity(settings, timeout_s=60.0) as control:
        return control.issue(device_ids)


def telemetry(device_id: str, seq: int, *, metrics: dict[str, float] | None = None) -> bytes:
    """A valid telemetry payload as a device sends it (msg_id derived from device and seq)."""
    return json.dumps({"device_id": device_id, "msg_id": f"{device_id}-{seq}", "seq": seq,
                       "ts": int(time.time() * 1000), "metrics": metrics or {"temp": 20.5, "hum": 40.0}}).encode()


async def register(settings: Settings, devices: list[str]) -> int:
    """Register ``devices`` in the registry (their events reach this test's worker through its
    outbox relay); telemetry of unregistered devices waits, then goes to the DLQ as unknown_device."""
    return await provision(settings, devices, device_type="test")


async def produce(settings: Settings, messages: Iterable[tuple[bytes, bytes]], *, rate: float | None = None) -> int:
    """Send (key, value) pairs to this test's sensor-data, acks=all, at most ``rate`` per second
    when given; return how many."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True, linger_ms=5)
    await producer.start()
    sent, started = 0, time.monotonic()
    try:
        for key, value in messages:
            await producer.send(topics.name(settings, topics.SENSOR_DATA), value, key=key)
            sent += 1
            if rate is not None and sent % 100 == 0:
                await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def produce_telemetry(settings: Settings, devices: list[str], per_device: int, first_seq: int = 0) -> int:
    """``per_device`` valid messages for each device, keyed by device id; return the count."""
    return await produce(
        settings,
        ((d.encode(), telemetry(d, seq)) for seq in range(first_seq, first_seq + per_device) for d in devices),
    )


async def stored_messages(settings: Settings, device_prefix: str) -> tuple[int, int]:
    """(rows, distinct messages) in sensor_measurements for devices starting with ``device_prefix``."""
    conn = await asyncpg.connect(settings.tsdb_dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS rows, count(DISTINCT (device_id, msg_id)) AS messages "
            "FROM sensor_measurements WHERE device_id LIKE $1", device_prefix + "%")
    finally:
        await conn.close()
    return int(row["rows"]), int(row["messages"])


async def dlq_messages(settings: Settings, timeout_ms: int = 5000) -> list:
    """Everything in this test's sensor-data-dlq."""
    return await topic_messages(settings, topics.SENSOR_DATA_DLQ, timeout_ms)


async def topic_messages(settings: Settings, topic: str, timeout_ms: int = 5000) -> list:
    """Everything in one of this test's topics (``topic`` without the prefix)."""
    consumer = AIOKafkaConsumer(topics.name(settings, topic), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    found = []
    try:
        while batch := await consumer.getmany(timeout_ms=timeout_ms):
            found.extend(m for msgs in batch.values() for m in msgs)
            timeout_ms = 1000
    finally:
        await consumer.stop()
    return found


async def committed_offsets(settings: Settings, topic: str = topics.SENSOR_DATA) -> dict[int, int]:
    """The consumer group's committed offsets of this test's ``topic`` (sensor-data), by partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.app_id)
    finally:
        await admin.close()
    topic = topics.name(settings, topic)
    return {tp.partition: found.offset for tp, found in offsets.items() if tp.topic == topic and found.offset >= 0}


async def unconsumed(settings: Settings, topic: str) -> dict[int, int]:
    """The records of this test's ``topic`` the consumer group has not committed yet, by partition
    (partitions it committed to their end left out): empty once everything written was processed."""
    committed = await committed_offsets(settings, topic)
    name = topics.name(settings, topic)
    # Subscribed, so that starting it fetches the topic's metadata (its partitions).
    consumer = AIOKafkaConsumer(name, bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                group_id=None)
    try:
        await consumer.start()
        found = consumer.partitions_for_topic(name)
        if not found:
            raise LookupError(f"topic {name!r} has no partitions the brokers know of")
        ends = await consumer.end_offsets([TopicPartition(name, p) for p in found])
    finally:
        await consumer.stop()
    return {tp.partition: end - committed.get(tp.partition, 0) for tp, end in ends.items()
            if end > committed.get(tp.partition, 0)}


class ReadLoad:
    """``threads`` clients reading ``paths`` of a worker in a loop until the block ends; ``statuses``
    counts the answers (a status code, or the exception's class name)."""

    def __init__(self, worker: WorkerProcess, paths: list[str], *, threads: int = 4) -> None:
        self.worker, self.paths = worker, paths
        self.statuses: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(threads)]

    def _read(self, offset: int) -> None:
        headers, i = self.worker.bearer("viewer"), offset
        while not self._stop.is_set():
            try:
                status = http_json("GET", self.worker.url + self.paths[i % len(self.paths)], headers=headers,
                                   timeout=5)[0]
            except OSError as exc:
                status = exc.__class__.__name__
            self.statuses[status] += 1
            i += len(self._threads)

    def __enter__(self) -> ReadLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def cache_results(worker: WorkerProcess) -> collections.Counter:
    """The worker's ``iotflow_cache_requests_total`` by result, from /metrics."""
    with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: collections.Counter = collections.Counter()
    for result, value in re.findall(r'iotflow_cache_requests_total\{result="(\w+)"\} ([0-9.e+]+)', text):
        found[result] = int(float(value))
    return found


def consumer_of(app: faust.App) -> Consumer:
    """``app``'s consumer through iotflow's transport, installed as iotflow.app installs it (no
    iotflow app made: its metrics would stay registered for the rest of the test session)."""
    app.transport = Transport(app.conf.broker_consumer, app)
    return cast(Consumer, app.consumer)
