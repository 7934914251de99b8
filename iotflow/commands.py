"""Commands to devices over MQTT: ``devices/{id}/commands``, QoS 1, each with a command id.

The orchestrator publishes through one paho client per worker (its own network thread, reconnecting
by itself). ``publish_all`` returns the commands the broker acknowledged (PUBACK) within the timeout;
the rest are left for the next tick, which publishes them again *with the same command id* — a
device applies a command id once, so a command published twice is installed once.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog

from iotflow.metrics import COMMANDS_PUBLISHED
from iotflow.mqtt_auth import account, configure
from iotflow.settings import Settings

log = structlog.get_logger(__name__)


def command_topic(device_id: str) -> str:
    return f"devices/{device_id}/commands"


@dataclass(frozen=True)
class Command:
    device_id: str
    command_id: str
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps({"command_id": self.command_id, **self.payload}, separators=(",", ":")).encode()


class CommandPublisher:
    def __init__(self, settings: Settings, client_id: str, *, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.client_id = client_id
        self.timeout_s = timeout_s
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()

    def _start(self) -> mqtt.Client:
        if self._client is None:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                                 protocol=mqtt.MQTTv311)
            client.max_inflight_messages_set(1000)
            client.reconnect_delay_set(min_delay=1, max_delay=10)
            client.on_connect = lambda c, u, f, reason, p: None if getattr(reason, "is_failure", False) else self._connected.set()
            client.on_disconnect = lambda c, u, f, reason, p: self._connected.clear()
            host, port = configure(client, self.settings, account(self.settings, "platform"))
            client.connect_async(host, port, keepalive=int(self.settings.mqtt_keepalive_s))
            client.loop_start()
            self._client = client
        return self._client

    async def publish_all(self, commands: Sequence[Command]) -> list[Command]:
        """Publish ``commands``; return those the broker acknowledged within the timeout."""
        if not commands:
            return []
        client = self._start()
        if not await asyncio.to_thread(self._connected.wait, self.timeout_s):
            log.warning("commands_broker_unreachable", url=self.settings.mqtt_url, pending=len(commands))
            return []
        sent = [(command, client.publish(command_topic(command.device_id), command.encode(), qos=1))
                for command in commands]
        acked = await asyncio.to_thread(_wait_acked, sent, self.timeout_s)
        COMMANDS_PUBLISHED.inc(len(acked))
        if len(acked) < len(commands):
            log.warning("commands_not_acknowledged", acknowledged=len(acked), published=len(commands))
        return acked

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


def _wait_acked(sent: list[tuple[Command, mqtt.MQTTMessageInfo]], timeout_s: float) -> list[Command]:
    deadline = time.monotonic() + timeout_s
    acked = []
    for command, info in sent:
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            continue
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError):
            continue  # the connection dropped: the next tick publishes it again
        if info.is_published():
            acked.append(command)
    return acked
