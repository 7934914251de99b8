"""Device identity on MQTT against the real Mosquitto (dynamic security + the device ACL patterns)
and a real worker: registration answers the device's password once; the broker refuses anonymous
clients, wrong passwords, a borrowed client id, and a device publishing under another device's
topics; rotation and revocation close the device's connection and refuse the old password;
deleting the device deletes its account; the platform accounts can do only their own job."""
from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from iotflow.mqtt_auth import Account, DynamicSecurity, account
from iotflow.testing import bearer, http_json, mqtt_client, wait_for

pytestmark = pytest.mark.timeout(240)


def refusal(settings, credentials: Account | None, client_id: str) -> str | None:
    """None when the broker accepts the CONNECT, else its reason."""
    try:
        if credentials is None:
            client = _anonymous(settings, client_id)
        else:
            client = mqtt_client(settings, client_id, credentials, timeout=5)
    except TimeoutError as exc:
        return str(exc)
    client.disconnect()
    client.loop_stop()
    return None


def _anonymous(settings, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    outcome: list[str] = []
    done = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: (outcome.append(str(reason)), done.set())
    host, port = settings.mqtt_url.rsplit("//", 1)[1].rsplit(":", 1)
    client.connect(host, int(port))
    client.loop_start()
    done.wait(5)
    if outcome != ["Success"]:
        client.loop_stop()
        raise TimeoutError(f"refused: {outcome}")
    return client


class Watcher:
    """The admin account (it may read every topic) recording what the broker delivers under devices/."""

    def __init__(self, settings, run_id: str) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.client = mqtt_client(settings, f"watch-{run_id}", account(settings, "admin"))
        subscribed = threading.Event()
        self.client.on_subscribe = lambda c, u, mid, reasons, p: subscribed.set()
        self.client.on_message = lambda c, u, m: self.seen.append((m.topic, m.payload))
        self.client.subscribe("devices/#", qos=1)
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_v5(client: mqtt.Client, topic: str, payload: bytes) -> str:
    """Publish at QoS 1 and return the reason code of the broker's PUBACK."""
    reasons: dict[int, str] = {}
    client.on_publish = lambda c, u, mid, reason, p: reasons.__setitem__(mid, str(reason))
    info = client.publish(topic, payload, qos=1)
    assert wait_for(lambda: info.mid in reasons, timeout=10)
    return reasons[info.mid]


def test_a_registered_device_can_publish_only_as_itself_until_revoked(settings, start_worker, run_id):
    worker = start_worker()
    worker.wait_ready()
    api = f"{worker.url}/api/v1/devices"
    operator, admin = bearer(settings, "operator"), bearer(settings, "admin")
    device, other = f"idn-{run_id}", f"idn-{run_id}-b"
    watcher = Watcher(settings, run_id)
    try:
        status, headers, body = http_json("POST", api, {"id": device, "name": "n", "type": "meter"}, headers=operator)
        assert status == 201 and headers["Cache-Control"] == "no-store"
        secret = body["mqtt"]["password"]
        assert (body["mqtt"]["username"], body["mqtt"]["client_id"]) == (device, device) and len(secret) >= 32
        status, _, again = http_json("POST", api, {"id": device, "name": "n", "type": "meter"}, headers=operator)
        assert status == 200 and "mqtt" not in again  # shown once
        assert http_json("POST", api, {"id": other, "name": "n", "type": "meter"}, headers=operator)[0] == 201
        assert http_json("GET", f"{api}/{device}/credentials", headers=operator)[2]["status"] == "active"

        # Who cannot connect at all.
        assert refusal(settings, None, f"anon-{run_id}") is not None
        assert refusal(settings, Account(device, secret + "x"), device) is not None
        assert refusal(settings, Account(device, secret), f"not-{device}") is not None  # its client id only
        assert refusal(settings, Account(device, secret), device) is None

        # What it can touch: its own topics only; the broker refuses the rest (MQTT 5 PUBACK reason).
        client = mqtt_client(settings, device, Account(device, secret), protocol=mqtt.MQTTv5)
        dropped = threading.Event()
        client.on_disconnect = lambda c, u, f, reason, p: dropped.set()
        own, forged = f"own-{uuid.uuid4().hex}".encode(), f"forged-{uuid.uuid4().hex}".encode()
        assert publish_v5(client, f"devices/{device}/telemetry", own) == "Success"
        assert publish_v5(client, f"devices/{other}/telemetry", forged) == "Not authorized"
        assert publish_v5(client, f"devices/{device}/commands", forged) == "Not authorized"
        assert publish_v5(client, "iotflow/anything", forged) == "Not authorized"
        assert wait_for(lambda: (f"devices/{device}/telemetry", own) in watcher.seen, timeout=10)
        assert not [t for t, p in watcher.seen if p == forged]

        # Rotation: the connection made with the old password is closed and that password refused.
        status, headers, rotated = http_json("POST", f"{api}/{device}/credentials", headers=operator)
        assert status == 200 and headers["Cache-Control"] == "no-store"
        assert dropped.wait(10), "the device's connection outlived the rotation"
        client.loop_stop()
        new_secret = rotated["mqtt"]["password"]
        assert new_secret != secret
        assert refusal(settings, Account(device, secret), device) is not None
        client = mqtt_client(settings, device, Account(device, new_secret))
        dropped = threading.Event()
        client.on_disconnect = lambda c, u, f, reason, p: dropped.set()

        # Revocation: disconnected, and it cannot come back.
        status, _, revoked = http_json("DELETE", f"{api}/{device}/credentials", headers=operator)
        assert (status, revoked["status"]) == (200, "revoked")
        assert dropped.wait(10), "the device's connection outlived the revocation"
        client.loop_stop()
        assert refusal(settings, Account(device, new_secret), device) is not None
        assert http_json("GET", f"{api}/{device}/credentials", headers=operator)[2]["status"] == "revoked"

        # A new password brings it back; deleting the device deletes its account.
        back = http_json("POST", f"{api}/{device}/credentials", headers=operator)[2]["mqtt"]["password"]
        assert refusal(settings, Account(device, back), device) is None
        assert http_json("DELETE", f"{api}/{device}", headers=admin)[0] == 200
        assert refusal(settings, Account(device, back), device) is not None
        control = DynamicSecurity(settings)
        try:
            assert control.status(device) == "none"
            assert control.status(other) == "active"
        finally:
            control.close()

        # Each credential action is in the audit log once.
        status, _, log = http_json("GET", f"{worker.url}/api/v1/audit?target_id={device}", headers=admin)
        actions = sorted(entry["action"] for entry in log["items"])
        assert actions == sorted(["device.register", "device.credentials.rotate", "device.credentials.revoke",
                                  "device.credentials.rotate", "device.delete"]), actions
    finally:
        watcher.close()


def test_a_device_cannot_take_a_platform_accounts_name(settings, start_worker):
    worker = start_worker()
    worker.wait_ready()
    status, _, body = http_json("POST", f"{worker.url}/api/v1/devices",
                                {"id": settings.mqtt_bridge_user, "name": "n", "type": "meter"},
                                headers=bearer(settings, "operator"))
    assert status == 422 and body["errors"][0]["field"] == "id", body
    # The bridge account still works as before.
    assert refusal(settings, account(settings, "bridge"), f"bridge-probe-{time.monotonic_ns()}") is None


def test_the_platform_accounts_can_do_only_their_own_job(settings, run_id):
    device = f"plat-{run_id}"
    control = DynamicSecurity(settings)
    try:
        secret = control.issue([device])[device]
    finally:
        control.close()
    watcher = Watcher(settings, f"p{run_id}")
    bridge = mqtt_client(settings, f"bridge-probe-{run_id}", account(settings, "bridge"), protocol=mqtt.MQTTv5)
    platform = mqtt_client(settings, f"platform-probe-{run_id}", account(settings, "platform"), protocol=mqtt.MQTTv5)
    dev = mqtt_client(settings, device, Account(device, secret), protocol=mqtt.MQTTv5)
    try:
        got: list[str] = []
        bridge.on_message = lambda c, u, m: got.append(m.topic)
        dev.on_message = lambda c, u, m: got.append("device:" + m.topic)
        subscribed = threading.Event()
        bridge.on_subscribe = lambda *a: subscribed.set()
        bridge.subscribe(f"$share/{settings.bridge_group}/devices/+/telemetry", qos=1)
        assert subscribed.wait(10)
        subscribed.clear()
        dev.on_subscribe = lambda *a: subscribed.set()
        dev.subscribe("devices/+/commands", qos=1)  # granted by the broker, but only its own are delivered
        assert subscribed.wait(10)
        # The bridge may not publish as a device; the platform may publish commands only.
        assert publish_v5(bridge, f"devices/{device}/telemetry", b"x") == "Not authorized"
        assert publish_v5(platform, f"devices/{device}/telemetry", b"x") == "Not authorized"
        assert publish_v5(platform, f"devices/{device}/commands", b"c1") == "Success"
        assert publish_v5(platform, f"devices/{device}-other/commands", b"c2") == "Success"
        assert publish_v5(dev, f"devices/{device}/telemetry", b"t") == "Success"
        assert wait_for(lambda: f"devices/{device}/telemetry" in got and f"device:devices/{device}/commands" in got,
                        timeout=10), got
        assert f"device:devices/{device}-other/commands" not in got  # another device's command never reaches it
        assert wait_for(lambda: (f"devices/{device}-other/commands", b"c2") in watcher.seen, timeout=10)
    finally:
        for client in (bridge, platform, dev):
            client.disconnect()
            client.loop_stop()
        watcher.close()
