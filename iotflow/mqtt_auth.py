"""Who may connect to the MQTT broker and what each may touch: Mosquitto's dynamic-security plugin.

Anonymous access is off. Every device has its own account in the plugin (username = client id =
device id, role ``iotflow-device``). What a device may touch comes from the broker's ``acl_file``
patterns (:func:`acl_file_text`): publish only ``devices/{its username}/`` telemetry, heartbeat and
firmware status, receive only ``devices/{its username}/commands``. Mosquitto 2.0's plugin has no
``%u`` substitution, so without the patterns each device would need a role of its own — twice the
plugin's objects, and the plugin's cost grows with them (below). The plugin answers first; where
no role of the account has a matching ACL it defers to the patterns (its default access is
"deny" for every kind, receiving included, which is what makes it defer). The platform has
three accounts of its own, each with the least it needs: the bridges (``iotflow-bridge``:
subscribe to the devices' topics, shared or not), the workers' command publisher
(``iotflow-platform``: publish to ``devices/+/commands``) and the credential manager
(``iotflow-admin``: the plugin's ``$CONTROL`` topic, nothing else).

Device credentials are issued, rotated and revoked by the worker through the plugin's control
topic (:class:`DynamicSecurity`): registering a device issues its password and answers it once
(iotflow/registry.py); rotating sets a new one and disconnects the device; revoking disables the
account and disconnects it; deleting the device deletes the account. Mosquitto keeps the accounts
(salted PBKDF2-SHA512 hashes) in its own JSON file; iotflow stores no device password anywhere.

Mosquitto 2.0 rewrites that whole file after each change, so issuing a credential costs time
proportional to the fleet's size (docs/security.md has the figures); bulk issuing sends 100
commands per control message.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import structlog

from iotflow.errors import MqttAuthError
from iotflow.settings import Settings

log = structlog.get_logger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
DEVICE_ROLE = "iotflow-device"  # no ACLs of its own: it marks an account as a device's
BRIDGE_ROLE = "iotflow-bridge"
PLATFORM_ROLE = "iotflow-platform"
# What a device may publish (the bridge's routes) and the one topic it may subscribe to.
DEVICE_PUBLISHES = ("telemetry", "heartbeat", "firmware/status")
DEVICE_SUBSCRIBES = "commands"
_BATCH = 100  # commands per control message when issuing for a fleet


@dataclass(frozen=True)
class Account:
    username: str
    password: str


def account(settings: Settings, which: str) -> Account:
    """A platform account from the settings: ``admin``, ``bridge`` or ``platform``."""
    return Account(getattr(settings, f"mqtt_{which}_user"), getattr(settings, f"mqtt_{which}_password"))


def broker_address(settings: Settings) -> tuple[str, int]:
    url = urlsplit(settings.mqtt_url)
    return url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883)


def configure(client: mqtt.Client, settings: Settings, credentials: Account) -> tuple[str, int]:
    """Set ``client``'s credentials (and TLS for an mqtts:// URL); return the host and port to connect to."""
    client.username_pw_set(credentials.username, credentials.password)
    secure(client, settings)
    return broker_address(settings)


def secure(client: mqtt.Client, settings: Settings) -> None:
    """For an mqtts:// URL: TLS 1.2 or later, the broker's certificate checked against
    IOTFLOW_MQTT_CA_FILE (or the system's CAs) and its name against the URL's host."""
    if urlsplit(settings.mqtt_url).scheme == "mqtts":
        client.tls_set(ca_certs=settings.mqtt_ca_file or None, cert_reqs=ssl.CERT_REQUIRED,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)


def signs_in(settings: Settings, credentials: Account, timeout_s: float) -> bool:
    """True when the broker accepts ``credentials`` (a CONNECT answered with CONNACK success)."""
    answered, outcome = threading.Event(), []
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"iotflow-probe-{uuid.uuid4().hex[:12]}",
                        clean_session=True, protocol=mqtt.MQTTv311)
    probe.on_connect = lambda c, u, f, reason, p: (outcome.append(not reason.is_failure), answered.set())
    host, port = configure(probe, settings, credentials)
    try:
        probe.connect(host, port, keepalive=10)
    except OSError:
        return False
    probe.loop_start()
    try:
        return answered.wait(timeout_s) and outcome[0]
    finally:
        probe.disconnect()
        probe.loop_stop()


def new_password() -> str:
    return secrets.token_urlsafe(24)


def acl_file_text() -> str:
    """The broker's ``acl_file``: each device's own topics, by its username."""
    lines = ["# iotflow: a device (username = device id) may publish only under its own topics and",
             "# receive only its own commands (iotflow/mqtt_auth.py). Generated; do not edit."]
    lines += [f"pattern write devices/%u/{suffix}" for suffix in DEVICE_PUBLISHES]
    lines.append(f"pattern read devices/%u/{DEVICE_SUBSCRIBES}")
    return "\n".join(lines) + "\n"


def reserved(settings: Settings) -> set[str]:
    """Usernames no device may have (the platform's accounts)."""
    return {settings.mqtt_admin_user, settings.mqtt_bridge_user, settings.mqtt_platform_user}


def role_acls(bridge_group: str) -> dict[str, list[dict[str, Any]]]:
    """The platform roles' ACLs (everything not allowed is denied: the plugin's default for
    publishing and subscribing)."""
    bridge: list[dict[str, Any]] = []
    for suffix in DEVICE_PUBLISHES:
        for topic in (f"devices/+/{suffix}", f"$share/{bridge_group}/devices/+/{suffix}"):
            bridge.append({"acltype": "subscribeLiteral", "topic": topic, "allow": True})
        bridge.append({"acltype": "publishClientReceive", "topic": f"devices/+/{suffix}", "allow": True})
    platform = [{"acltype": "publishClientSend", "topic": f"devices/+/{DEVICE_SUBSCRIBES}", "allow": True}]
    return {BRIDGE_ROLE: bridge, PLATFORM_ROLE: platform}


class DynamicSecurity:
    """A connection to the broker as the admin account that sends ``$CONTROL`` commands and waits
    for their answers (matched by correlation data: every admin connection sees every answer).
    Thread-safe; the async callers go through ``asyncio.to_thread``."""

    def __init__(self, settings: Settings, *, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._client: mqtt.Client | None = None
        self._ready = threading.Event()
        self._refused: str | None = None

    def _connect(self) -> mqtt.Client:
        with self._lock:
            if self._client is not None:
                return self._client
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"iotflow-admin-{uuid.uuid4().hex[:12]}",
                                 clean_session=True, protocol=mqtt.MQTTv311)
            host, port = configure(client, self.settings, account(self.settings, "admin"))
            client.reconnect_delay_set(min_delay=1, max_delay=10)
            client.on_connect = self._on_connect
            client.on_disconnect = lambda c, u, f, reason, p: self._ready.clear()
            client.on_subscribe = lambda c, u, mid, reasons, p: self._ready.set()
            client.on_message = self._on_message
            client.connect_async(host, port, keepalive=30)
            client.loop_start()
            self._client = client
            return client

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any, props: object) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            return
        self._refused = None
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        for response in responses:
            correlation = response.get("correlationData")
            with self._lock:
                waiting = self._waiting.get(correlation)
            if waiting is not None:
                waiting[1].append(response)
                waiting[0].set()

    def call(self, commands: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands`` in one control message; their responses in order (each may name an ``error``)."""
        client = self._connect()
        if not self._ready.wait(self.timeout_s):
            why = f"refused: {self._refused}" if self._refused else "no answer"
            raise MqttAuthError(f"the MQTT broker's credential manager is unreachable at {self.settings.mqtt_url} ({why})")
        tagged = []
        slots = []
        for command in commands:
            correlation = uuid.uuid4().hex
            slot: tuple[threading.Event, list[dict[str, Any]]] = (threading.Event(), [])
            tagged.append({**command, "correlationData": correlation})
            slots.append((correlation, slot))
        with self._lock:
            self._waiting.update(slots)
        try:
            client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            deadline = time.monotonic() + self.timeout_s
            for _, (event, _answer) in slots:
                if not event.wait(max(0.0, deadline - time.monotonic())):
                    raise MqttAuthError(f"the MQTT broker did not answer {command_names(commands)} within {self.timeout_s} s")
            return [answer[0] for _, (_event, answer) in slots]
        finally:
            with self._lock:
                for correlation, _ in slots:
                    self._waiting.pop(correlation, None)

    def __enter__(self) -> DynamicSecurity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # -- operations ---------------------------------------------------------------------------
    def ensure_roles(self) -> None:
        """Deny by default (so the plugin defers to the broker's device patterns), then create the
        roles, or add what an existing one lacks (idempotent)."""
        _check(self.call([{"command": "setDefaultACLAccess", "acls": [
            {"acltype": kind, "allow": False}
            for kind in ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe")]}]))
        for role, acls in {**role_acls(self.settings.bridge_group), DEVICE_ROLE: []}.items():
            created = self.call([{"command": "createRole", "rolename": role, "acls": acls}])[0]
            if created.get("error") and "already exists" not in created["error"]:
                raise MqttAuthError(f"createRole {role}: {created['error']}")
            if created.get("error") and acls:
                answers = self.call([{"command": "addRoleACL", "rolename": role, **acl} for acl in acls])
                _check(answers, tolerate="already exists")

    def ensure_platform_accounts(self) -> None:
        """The roles, and the bridge and platform accounts with the settings' passwords."""
        self.ensure_roles()
        # An account that already signs in with its password and has its role is left alone:
        # changing it would close the running bridges' and workers' connections.
        wanted = [(account(self.settings, "bridge"), BRIDGE_ROLE, None),
                  (account(self.settings, "platform"), PLATFORM_ROLE, None)]
        self.set_accounts([entry for entry in wanted if not self._in_place(*entry[:2])])

    def _in_place(self, credentials: Account, role: str) -> bool:
        found = self.call([{"command": "getClient", "username": credentials.username}])[0]
        client = found.get("data", {}).get("client", {})
        if found.get("error") or client.get("disabled") or role not in _roles(client):
            return False
        return signs_in(self.settings, credentials, self.timeout_s)

    def set_accounts(self, accounts: Sequence[tuple[Account, str, str | None]], *,
                     existing_must_have: str | None = None) -> None:
        """Create each (account, role, client id or None), or give an existing one this password,
        role and client id, and enable it. Changing an account closes its connections. With
        ``existing_must_have``, an existing account without that role is refused, never changed."""
        for start in range(0, len(accounts), _BATCH):
            chunk = accounts[start:start + _BATCH]
            created = self.call([_create(*entry) for entry in chunk])
            _check(created, tolerate="already exists")
            existing = [entry for entry, answer in zip(chunk, created, strict=True) if answer.get("error")]
            if not existing:
                continue
            if existing_must_have is not None:
                found = self.call([{"command": "getClient", "username": entry[0].username} for entry in existing])
                _check(found)
                for entry, answer in zip(existing, found, strict=True):
                    if existing_must_have not in _roles(answer.get("data", {}).get("client", {})):
                        raise MqttAuthError(f"the MQTT account {entry[0].username!r} exists and is not a device's")
            commands = [{**_create(*entry), "command": "modifyClient"} for entry in existing]
            commands += [{"command": "enableClient", "username": entry[0].username} for entry in existing]
            _check(self.call(commands))

    def issue(self, device_ids: Iterable[str]) -> dict[str, str]:
        """A new password for each device (its account created if it has none, enabled if it was
        revoked); the old password stops working and connections made with it are closed. An
        existing account that is not a device's (a platform account) is never touched."""
        passwords = {device_id: new_password() for device_id in self._devices_only(device_ids)}
        self.set_accounts([(Account(d, p), DEVICE_ROLE, d) for d, p in passwords.items()],
                          existing_must_have=DEVICE_ROLE)
        return passwords

    def _devices_only(self, device_ids: Iterable[str]) -> list[str]:
        ids = list(device_ids)
        taken = reserved(self.settings).intersection(ids)
        if taken:
            raise MqttAuthError(f"{sorted(taken)[0]!r} is a platform account's name, not a device's")
        return ids

    def revoke(self, device_id: str) -> bool:
        """Disable the device's account (its connection is closed); False when it has none."""
        self._devices_only([device_id])
        answer = self.call([{"command": "disableClient", "username": device_id}])[0]
        if answer.get("error") and "not found" in answer["error"].lower():
            return False
        _check([answer])
        return True

    def delete(self, device_ids: Iterable[str]) -> int:
        """Delete the devices' accounts (connections closed); how many existed."""
        ids = self._devices_only(device_ids)
        deleted = 0
        for start in range(0, len(ids), _BATCH):
            chunk = ids[start:start + _BATCH]
            answers = self.call([{"command": "deleteClient", "username": d} for d in chunk])
            _check(answers, tolerate="not found")
            deleted += sum(1 for a in answers if not a.get("error"))
        return deleted

    def status(self, device_id: str) -> str:
        """``active``, ``revoked`` or ``none`` (no account)."""
        answer = self.call([{"command": "getClient", "username": device_id}])[0]
        if answer.get("error"):
            if "not found" in answer["error"].lower():
                return "none"
            _check([answer])
        return "revoked" if answer.get("data", {}).get("client", {}).get("disabled") else "active"


def _create(credentials: Account, role: str, client_id: str | None) -> dict[str, Any]:
    """createClient's command (modifyClient takes the same fields)."""
    command = {"command": "createClient", "username": credentials.username, "password": credentials.password,
               "roles": [{"rolename": role}]}
    if client_id is not None:
        command["clientid"] = client_id
    return command


def _roles(client: dict[str, Any]) -> set[str]:
    """The role names of a getClient answer's client."""
    return {r.get("rolename") for r in client.get("roles", [])}


def command_names(commands: Sequence[dict[str, Any]]) -> str:
    names = sorted({c["command"] for c in commands})
    return f"{', '.join(names)} ({len(commands)} commands)"


def _check(answers: Sequence[dict[str, Any]], *, tolerate: str | None = None) -> None:
    for answer in answers:
        error = answer.get("error")
        if error and not (tolerate and tolerate in error.lower()):
            raise MqttAuthError(f"the MQTT broker refused {answer.get('command')}: {error}")


class DeviceCredentials:
    """The worker's side of :class:`DynamicSecurity`: one admin connection (opened on first use),
    each call off the event loop."""

    def __init__(self, settings: Settings) -> None:
        self._control = DynamicSecurity(settings)

    async def issue(self, device_id: str) -> str:
        return (await asyncio.to_thread(self._control.issue, [device_id]))[device_id]

    async def revoke(self, device_id: str) -> bool:
        return await asyncio.to_thread(self._control.revoke, device_id)

    async def delete(self, device_id: str) -> None:
        await asyncio.to_thread(self._control.delete, [device_id])

    async def status(self, device_id: str) -> str:
        return await asyncio.to_thread(self._control.status, device_id)

    def close(self) -> None:
        self._control.close()
