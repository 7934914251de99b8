"""The MQTT → Kafka bridge (``iotflow bridge``).

A device's QoS 1 message is acknowledged to the broker only after Kafka confirmed it with
acks=all through the idempotent producer (invariant 1). Until then the broker keeps it in the
bridge's persistent session and redelivers it if the bridge dies: a crash loses nothing, and the
rare redelivery of a message Kafka already had is removed downstream (invariant 2).

* Several bridges split the load through one shared subscription (``$share/<group>/…``).
* In flight is bounded by MQTT 5's Receive Maximum: the broker sends no more unacknowledged
  messages than that, so a slow Kafka slows the devices' broker queue, never the bridge's memory.
* A per-device token bucket delays (and counts) a device that sends faster than its rate; its
  messages keep their order.
* Every Kafka call has a timeout and is retried with backoff until it succeeds; the MQTT
  connection is re-established with exponential backoff and full jitter.

paho-mqtt runs its network loop in its own thread; messages cross into the asyncio loop with
``call_soon_threadsafe`` and acknowledgements go back through paho's thread-safe ``ack``.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import Counter, Gauge, start_http_server

from iotflow import topics
from iotflow.logs import Throttle
from iotflow.backoff import TokenBuckets, full_jitter
from iotflow.mqtt_auth import account, configure
from iotflow.settings import Settings

log = structlog.get_logger(__name__)

FORWARDED = Counter("iotflow_bridge_forwarded_total", "MQTT messages produced to Kafka and acknowledged.", ["kind"])
DELAYED = Counter("iotflow_bridge_rate_limited_total", "Messages delayed by a device's rate limit.")
REJECTED = Counter("iotflow_bridge_rejected_total", "MQTT messages on a topic the bridge does not serve.")
IN_FLIGHT = Gauge("iotflow_bridge_in_flight", "Messages received from MQTT and not yet acknowledged.")

# MQTT topic suffix → Kafka topic; the device id is the second level of every device topic.
ROUTES = {
    "telemetry": topics.SENSOR_DATA,
    "heartbeat": topics.DEVICE_EVENTS,
    "firmware/status": topics.FIRMWARE_STATUS,
}


@dataclass(frozen=True)
class Route:
    device_id: str
    kind: str
    kafka_topic: str


def route(mqtt_topic: str) -> Route | None:
    """``devices/{id}/telemetry`` → (id, telemetry, sensor-data); None for anything else."""
    parts = mqtt_topic.split("/", 2)
    if len(parts) != 3 or parts[0] != "devices" or not parts[1] or parts[2] not in ROUTES:
        return None
    return Route(parts[1], parts[2], ROUTES[parts[2]])


def subscriptions(group: str, mode: str = "shared") -> list[str]:
    """The bridge's topic filters: shared (``$share/<group>/…``: bridges split the devices'
    messages) or exclusive (every bridge gets every message; the broker keeps the subscription of
    a persistent session across its own restart — Mosquitto 2.0 does not keep shared ones)."""
    prefix = f"$share/{group}/" if mode == "shared" else ""
    return [f"{prefix}devices/+/{suffix}" for suffix in ROUTES]


class Bridge:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Stable across restarts: the broker keeps the unacknowledged messages in this session.
        self.client_id = settings.bridge_client_id
        self.limiter = TokenBuckets(settings.bridge_device_rate_per_s, settings.bridge_device_burst)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: AIOKafkaProducer | None = None
        self._client: mqtt.Client | None = None
        self._stopping = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # An idempotent producer can get stuck failing every send with OUT_OF_ORDER_SEQUENCE_NUMBER
        # (aiokafka issue #1017; on a just-created topic, KAFKA-15591): seen here in CI on a fresh
        # broker. After 20 consecutive failures it is replaced by a new one (new producer id).
        self._producer_generation = 0
        self._consecutive_failures = 0
        self._send_failures = Throttle(every_s=10.0)  # one warning per topic per 10 s in an outage, with a count
        self._producer_lock = asyncio.Lock()

    async def run(self, stop: asyncio.Event) -> None:
        """Bridge until ``stop`` is set; then stop taking messages and finish those in flight."""
        self._loop = asyncio.get_running_loop()
        self._producer = await self._start_producer()
        mqtt_thread = threading.Thread(target=self._mqtt_loop, name="mqtt", daemon=True)
        mqtt_thread.start()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=30)
                except asyncio.TimeoutError:
                    self.limiter.forget_idle(time.monotonic())
        finally:
            self._stopping.set()
            if self._client is not None:
                self._client.disconnect()
            await asyncio.to_thread(mqtt_thread.join, 10)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=30)
            await self._producer.stop()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            request_timeout_ms=int(self.settings.kafka_request_timeout_s * 1000),
        )

    async def _start_producer(self) -> AIOKafkaProducer:
        attempt = 0
        while True:
            producer = self._new_producer()
            try:
                await asyncio.wait_for(producer.start(), self.settings.kafka_request_timeout_s)
                return producer
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                try:
                    await asyncio.wait_for(producer.stop(), self.settings.kafka_request_timeout_s)
                except (KafkaError, OSError, asyncio.TimeoutError):
                    pass  # it never started; nothing of ours is in it
                delay = full_jitter(attempt, base_s=0.5, cap_s=30)
                log.warning("kafka_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
                attempt += 1

    # -- the MQTT side (paho's thread) ----------------------------------------------------
    def _mqtt_loop(self) -> None:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        host, port = configure(client, self.settings, account(self.settings, "bridge"))
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._client = client
        attempt = 0
        while not self._stopping.is_set():
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600  # the broker keeps our unacked messages for an hour
            properties.ReceiveMaximum = self.settings.bridge_max_in_flight
            try:
                client.connect(host, port, keepalive=int(self.settings.mqtt_keepalive_s),
                               clean_start=False, properties=properties)
                attempt = 0
                client.loop_forever(retry_first_connection=False)
            except OSError as exc:
                log.warning("mqtt_connect_failed", error=str(exc))
            if self._stopping.is_set():
                break
            delay = full_jitter(attempt, base_s=0.5, cap_s=30)
            log.warning("mqtt_disconnected", reconnect_in_s=round(delay, 2))
            self._stopping.wait(delay)
            attempt += 1

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("mqtt_connect_refused", reason=str(reason))
            return
        log.info("mqtt_connected", client_id=self.client_id)
        client.subscribe([(t, 1) for t in subscriptions(self.settings.bridge_group, self.settings.bridge_subscription)])

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        assert self._loop is not None
        IN_FLIGHT.inc()
        self._loop.call_soon_threadsafe(self._spawn, message)

    # -- the Kafka side (asyncio) ----------------------------------------------------------
    def _spawn(self, message: mqtt.MQTTMessage) -> None:
        target = route(message.topic)
        if target is None:
            REJECTED.inc()
            log.warning("mqtt_topic_not_served", topic=message.topic)
            self._ack(message)
            return
        delay = self.limiter.reserve(target.device_id, time.monotonic())
        if delay > 0:
            DELAYED.inc()
        task = asyncio.get_running_loop().create_task(self._forward(message, target, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, message: mqtt.MQTTMessage, target: Route, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        kafka_topic = topics.name(self.settings, target.kafka_topic)
        attempt = 0
        while True:
            producer, generation = self._producer, self._producer_generation
            assert producer is not None
            try:
                await asyncio.wait_for(
                    producer.send_and_wait(kafka_topic, message.payload, key=target.device_id.encode(),
                                           headers=[(topics.KIND_HEADER, target.kind.encode())]),
                    self.settings.kafka_request_timeout_s,
                )
                self._consecutive_failures = 0
                break
            except (KafkaError, asyncio.TimeoutError) as exc:
                # Not acknowledged: the broker still holds it. Keep trying; never drop.
                pause = full_jitter(attempt, base_s=0.2, cap_s=10)
                held = self._send_failures.allow(kafka_topic)
                if held is not None:
                    log.warning("kafka_send_failed", error=repr(exc), topic=kafka_topic, retry_in_s=round(pause, 2),
                                failures_held_back=held)
                await self._replace_producer_if_stuck(generation)
                await asyncio.sleep(pause)
                attempt += 1
        FORWARDED.labels(target.kind).inc()
        self._ack(message)

    async def _replace_producer_if_stuck(self, generation: int) -> None:
        async with self._producer_lock:
            if generation != self._producer_generation:
                return  # another task replaced it already
            self._consecutive_failures += 1
            if self._consecutive_failures < 20:
                return
            log.warning("kafka_producer_replaced", failures=self._consecutive_failures)
            old, self._producer = self._producer, await self._start_producer()
            self._producer_generation += 1
            self._consecutive_failures = 0
        if old is not None:
            try:
                await asyncio.wait_for(old.stop(), self.settings.kafka_request_timeout_s)
            except (KafkaError, asyncio.TimeoutError) as exc:
                log.warning("kafka_producer_stop_failed", error=repr(exc))

    def _ack(self, message: mqtt.MQTTMessage) -> None:
        IN_FLIGHT.dec()
        if self._client is not None and message.qos > 0:
            self._client.ack(message.mid, message.qos)


def run_bridge(settings: Settings) -> None:
    """Run one bridge until SIGINT/SIGTERM."""
    import signal

    from iotflow import logs

    logs.configure(settings.log_level)
    logs.quiet_repeats("aiokafka")
    # /metrics of this bridge (forwarded, rate-limited, rejected, in flight), in a daemon thread.
    start_http_server(settings.bridge_metrics_port, addr=settings.web_host)
    log.info("bridge_metrics", url=f"http://{settings.web_host}:{settings.bridge_metrics_port}/metrics")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Bridge(settings).run(stop)

    asyncio.run(main())

