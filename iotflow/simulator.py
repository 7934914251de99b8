"""A simulated fleet (``iotflow simulate``): N devices publishing telemetry over MQTT with QoS 1.

Each device is a paho-mqtt client with a persistent session. It sends the design.md payload
with ``seq`` increasing by one and a fresh ``msg_id`` per message; a fraction of messages are
sent twice byte for byte (a device retry) and a fraction of extra, malformed payloads are mixed
in (they take no ``seq``, so a perfect pipeline shows no gaps). While disconnected a device
keeps its messages in paho's local queue and sends them on reconnect; reconnects wait with
exponential backoff and full jitter. Everything random comes from ``--seed``. Before the first
message the fleet is provisioned in the device registry (``--no-register`` leaves it unknown:
its telemetry then waits for a registration and goes to the DLQ as ``unknown_device``), and each
device's MQTT account is given a new password through Mosquitto's dynamic security (the simulator
acts as an admin rotating its devices' credentials; iotflow/mqtt_auth.py).

The returned summary says, per device, what was sent: it is what the accounting is checked
against.

With ``firmware`` set, every device also answers firmware commands on ``devices/{id}/commands``
(:class:`FirmwareDevice`): it applies a command id once (a command published again is counted as a
duplicate and its last state reported again), "downloads" and verifies the image (simulated: a
device picked to fail reports a checksum mismatch), installs, reboots (no heartbeat nor telemetry
for ``reboot_s``) and reports each state on ``devices/{id}/firmware/status``. Shares of devices
can be made to fail, to go silent mid-update (the orchestrator times them out) or to go silent
right after reporting SUCCEEDED (the health gate catches them).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import random
import selectors
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import paho.mqtt.client as mqtt

from iotflow.backoff import full_jitter
from iotflow.mqtt_auth import DynamicSecurity, broker_address, secure
from iotflow.registry import provision
from iotflow.settings import Settings

MALFORMED_KINDS = (
    "not_json", "wrong_type", "missing_field", "unknown_field", "not_finite", "bad_device_id", "huge", "too_old",
)


@dataclass
class DeviceReport:
    device_id: str
    sent: int = 0  # distinct valid messages (one per seq)
    first_seq: int | None = None
    last_seq: int | None = None
    duplicates: int = 0
    malformed: int = 0
    acked: int = 0  # PUBACKs received from the broker (valid, duplicate and malformed alike)
    connection_losses: int = 0  # times the connection dropped while the device was running
    connects: int = 0  # connections the broker accepted (the first one and every reconnect)
    buffer_overflows: int = 0  # messages refused because the local buffer was full (lost by the device)
    firmware_version: str | None = None
    commands: int = 0  # distinct firmware command ids received
    duplicate_commands: int = 0  # the same command id received again
    installs: int = 0  # firmware images installed
    update_outcomes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FirmwareBehaviour:
    """How simulated devices answer firmware commands (shares are of commands, drawn per device)."""

    version: str = "1.0.0"  # what the devices run at the start
    step_s: float = 0.2  # between two reports
    reboot_s: float = 1.0  # silent while rebooting
    fail_ratio: float = 0.0  # report FAILED (checksum mismatch) after downloading
    timeout_ratio: float = 0.0  # go silent after DOWNLOADING (never report again)
    silent_ratio: float = 0.0  # report SUCCEEDED, then never heartbeat again

@dataclass
class FleetConfig:
    devices: int = 10
    messages_per_device: int | None = 100
    duration_s: float | None = None
    rate_per_device: float = 10.0
    duplicate_ratio: float = 0.0
    malformed_ratio: float = 0.0
    seed: int = 0
    prefix: str = "sim"
    heartbeat_s: float = 30.0
    buffer_size: int = 100_000  # messages a disconnected device keeps locally
    register: bool = True  # provision the fleet in the device registry before the first message
    progress: bool = False
    firmware: FirmwareBehaviour | None = None  # answer firmware commands (None: ignore them)


@dataclass
class _Device:
    report: DeviceReport
    client: mqtt.Client
    rng: random.Random
    seq: int = 0
    reconnects: int = 0
    stopping: bool = False  # set before the run's own disconnect
    silent_until: float = 0.0  # monotonic time until which it publishes nothing of its own (rebooting)
    silent: bool = False  # gone silent for good (a simulated bricked device)
    applied: dict[str, str] = field(default_factory=dict)  # command id → last state reported for it
    opened: bool = False  # its first connect was made
    connected: threading.Event = field(default_factory=threading.Event)
    published: int = 0  # QoS 1 publishes handed to paho (sent, or queued while disconnected)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Network:
    """One thread runs every device's MQTT connection (paho's loop_read/loop_write/loop_misc over a
    selector): a fleet of thousands costs one thread, not one per device. Other threads publish
    through paho's thread-safe queue; a device whose connection dropped reconnects after the delay
    its ``on_disconnect`` chose."""

    def __init__(self, host: str, port: int, keepalive_s: int) -> None:
        self.host, self.port, self.keepalive_s = host, port, keepalive_s
        self._selector = selectors.DefaultSelector()
        self._fds: dict[int, _Device] = {}  # registered socket fd → device
        self._fd_of: dict[int, int] = {}  # id(device) → its registered fd
        self._writers: set[int] = set()  # id(device) of devices with something to send
        self._by_id: dict[int, _Device] = {}
        self._reconnects: list[tuple[float, int, int]] = []  # (due, order, id(device))
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="simulator-network", daemon=True)
            self._thread.start()

    def connect(self, device: _Device) -> None:
        with self._lock:
            self._by_id[id(device)] = device
        self.reconnect_later(device, 0.0)

    def wants_write(self, device: _Device) -> None:
        with self._lock:
            self._writers.add(id(device))

    def reconnect_later(self, device: _Device, delay_s: float) -> None:
        with self._lock:
            heapq.heappush(self._reconnects, (time.monotonic() + delay_s, next(self._order), id(device)))

    def stop(self, flush_s: float = 10.0) -> None:
        """Send what is queued (the devices' DISCONNECTs), then close every connection."""
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline:
            with self._lock:
                # A snapshot: the network thread registers and unregisters sockets without the lock
                # (list() of a dict is one step under the GIL; iterating it live raced: "dictionary
                # changed size during iteration" with 5,000 devices reconnecting).
                pending = any(self._by_id[i].client.want_write() for i in list(self._fd_of))
            if not pending:
                break
            time.sleep(0.02)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for device in self._by_id.values():
            sock = device.client.socket()
            if sock is not None:
                sock.close()

    def _register(self, device: _Device) -> None:
        self._unregister(device)
        sock = device.client.socket()
        if sock is None:
            return
        fd = sock.fileno()
        self._selector.register(fd, selectors.EVENT_READ, device)
        self._fds[fd] = device
        self._fd_of[id(device)] = fd

    def _unregister(self, device: _Device) -> None:
        fd = self._fd_of.pop(id(device), None)
        if fd is not None:
            self._fds.pop(fd, None)
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _run(self) -> None:
        last_misc = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            due = []
            with self._lock:
                while self._reconnects and self._reconnects[0][0] <= now:
                    due.append(self._by_id[heapq.heappop(self._reconnects)[2]])
            for device in due:
                self._open(device)
            if self._fds:
                events = self._selector.select(timeout=0.02)
            else:
                events = []
                time.sleep(0.02)
            for key, _ in events:
                device = key.data
                if device.client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    self._lost(device)
            with self._lock:
                writers, self._writers = self._writers, set()
            for ident in writers:
                device = self._by_id[ident]
                if ident in self._fd_of and device.client.want_write():
                    if device.client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                        self._lost(device)
                    elif device.client.want_write():
                        self.wants_write(device)  # more than one write's worth queued
            if now - last_misc >= 1.0:  # keepalive pings and their timeouts
                last_misc = now
                for ident in list(self._fd_of):
                    device = self._by_id[ident]
                    if device.client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                        self._lost(device)
                    elif device.client.want_write():
                        self.wants_write(device)  # in case a register-write callback was skipped

    def _open(self, device: _Device) -> None:
        if device.stopping:
            return
        try:
            if device.client.socket() is None and not device.opened:
                device.opened = True
                device.client.connect(self.host, self.port, keepalive=self.keepalive_s)
            else:
                device.client.reconnect()
        except (OSError, mqtt.WebsocketConnectionError):
            device.connected.clear()
            self._unregister(device)
            self.reconnect_later(device, full_jitter(device.reconnects, base_s=0.2, cap_s=10.0, rng=device.rng))
            device.reconnects += 1
            return
        self._register(device)
        self.wants_write(device)  # the CONNECT packet

    def _lost(self, device: _Device) -> None:
        """The connection dropped (paho called on_disconnect, which scheduled the reconnect)."""
        self._unregister(device)
        if not device.stopping and device.connected.is_set():
            device.connected.clear()


def malformed_payload(kind: str, device_id: str, rng: random.Random, now_ms: int) -> bytes:
    """A payload the pipeline must send to the DLQ, of the given kind."""
    good = {"device_id": device_id, "msg_id": f"bad-{rng.getrandbits(64):016x}", "seq": 0, "ts": now_ms,
            "metrics": {"temp": 1.0}}
    if kind == "not_json":
        return b"{not json"
    if kind == "wrong_type":
        return json.dumps({**good, "seq": "seven"}).encode()
    if kind == "missing_field":
        return json.dumps({k: v for k, v in good.items() if k != "metrics"}).encode()
    if kind == "unknown_field":
        return json.dumps({**good, "firmware": "1.2.3"}).encode()
    if kind == "not_finite":
        return json.dumps(good).replace('"temp": 1.0', '"temp": 1e999').encode()
    if kind == "bad_device_id":
        return json.dumps({**good, "device_id": device_id + " x"}).encode()
    if kind == "huge":
        return json.dumps({**good, "metrics": {f"m{i}": float(i) for i in range(5000)}}).encode()
    if kind == "too_old":
        return json.dumps({**good, "ts": now_ms - 400 * 86_400_000}).encode()
    raise ValueError(kind)


def device_ids(prefix: str, count: int) -> list[str]:
    """The ids of a simulated fleet: PREFIX-00000, PREFIX-00001, …"""
    return [f"{prefix}-{i:05d}" for i in range(count)]


class Fleet:
    def __init__(self, settings: Settings, config: FleetConfig) -> None:
        self.settings = settings
        self.config = config
        self.registered = 0  # devices this run added to the registry
        master = random.Random(config.seed)
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._due_changed = threading.Condition()
        self._stop_scheduler = False
        self.network = _Network(*broker_address(settings), int(settings.mqtt_keepalive_s))
        self.devices = [self._device(device_id, random.Random(master.getrandbits(64)))
                        for device_id in device_ids(config.prefix, config.devices)]

    def _device(self, device_id: str, rng: random.Random) -> _Device:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False,
                             protocol=mqtt.MQTTv311)
        client.max_queued_messages_set(self.config.buffer_size)
        client.max_inflight_messages_set(100)
        secure(client, self.settings)
        device = _Device(DeviceReport(device_id), client, rng)

        def on_connect(c: mqtt.Client, u: object, flags: object, reason: object, props: object) -> None:
            if not getattr(reason, "is_failure", False):
                device.reconnects = 0
                device.report.connects += 1
                device.connected.set()
                if self.config.firmware is not None:
                    c.subscribe(f"devices/{device_id}/commands", qos=1)

        def on_disconnect(c: mqtt.Client, u: object, flags: object, reason: object, props: object) -> None:
            device.connected.clear()
            if not device.stopping:
                device.report.connection_losses += 1
                # Full jitter before the reconnect: a fleet dropped at once comes back spread out.
                self.network.reconnect_later(device, full_jitter(device.reconnects, base_s=0.2, cap_s=10.0, rng=device.rng))
                device.reconnects += 1

        def on_publish(c: mqtt.Client, u: object, mid: int, reason: object, props: object) -> None:
            with device.lock:
                device.report.acked += 1

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_socket_register_write = lambda c, u, sock: self.network.wants_write(device)
        client.on_socket_unregister_write = lambda c, u, sock: None
        if self.config.firmware is not None:
            device.report.firmware_version = self.config.firmware.version
            client.on_message = lambda c, u, message: self._on_command(device, message.payload)
        return device

    # -- firmware commands (paho's thread; reports go out from the scheduler thread) ----------
    def _on_command(self, device: _Device, payload: bytes) -> None:
        behaviour = self.config.firmware
        assert behaviour is not None
        try:
            command = json.loads(payload)
            command_id, rollout_id, version = command["command_id"], command["rollout_id"], command["version"]
        except (ValueError, KeyError, TypeError):
            return  # not a command this device understands
        report = device.report
        with device.lock:
            last = device.applied.get(command_id)
            if last is not None:
                report.duplicate_commands += 1
                self._later(0.0, lambda: self._report(device, command_id, rollout_id, last))
                return
            device.applied[command_id] = "NOTIFIED"
            report.commands += 1
            draw = device.rng.random()
        ratios = (behaviour.fail_ratio, behaviour.timeout_ratio, behaviour.silent_ratio)
        outcome = ("fail" if draw < ratios[0] else "timeout" if draw < sum(ratios[:2])
                   else "silent" if draw < sum(ratios) else "ok")
        report.update_outcomes[outcome] = report.update_outcomes.get(outcome, 0) + 1
        step = behaviour.step_s
        self._later(0.0, lambda: self._report(device, command_id, rollout_id, "DOWNLOADING"))
        if outcome == "timeout":
            return  # never heard of again for this command
        self._later(step, lambda: self._report(device, command_id, rollout_id, "DOWNLOADED"))
        if outcome == "fail":
            self._later(2 * step, lambda: self._report(device, command_id, rollout_id, "FAILED",
                                                       error=f"checksum mismatch: expected {command.get('sha256')}"))
            return
        self._later(2 * step, lambda: self._report(device, command_id, rollout_id, "VERIFIED"))
        self._later(3 * step, lambda: self._report(device, command_id, rollout_id, "UPDATING"))

        def reboot() -> None:
            device.silent_until = time.monotonic() + behaviour.reboot_s

        def booted() -> None:
            with device.lock:
                report.installs += 1
                report.firmware_version = version
            self._report(device, command_id, rollout_id, "SUCCEEDED")
            if outcome == "silent":
                device.silent = True

        self._later(3 * step, reboot)
        self._later(3 * step + behaviour.reboot_s, booted)

    def _report(self, device: _Device, command_id: str, rollout_id: str, state: str, error: str | None = None) -> None:
        with device.lock:
            device.applied[command_id] = state
        body = {"command_id": command_id, "rollout_id": rollout_id, "state": state, "ts": int(time.time() * 1000)}
        if error:
            body["error"] = error
        self._publish(device, "firmware/status", json.dumps(body).encode())

    def _later(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._due_changed:
            heapq.heappush(self._due, (time.monotonic() + delay_s, next(self._order), action))
            self._due_changed.notify()

    def _run_due(self) -> None:
        """The scheduler thread: runs the devices' timed actions in order."""
        with self._due_changed:
            while not self._stop_scheduler:
                if not self._due:
                    self._due_changed.wait(0.5)
                    continue
                due, _, action = self._due[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._due_changed.wait(min(wait, 0.5))
                    continue
                heapq.heappop(self._due)
                self._due_changed.release()
                try:
                    action()
                finally:
                    self._due_changed.acquire()

    def _quiet(self, device: _Device, now: float) -> bool:
        return device.silent or now < device.silent_until

    def connect(self, timeout: float = 90.0) -> None:
        self.network.start()
        for device in self.devices:
            self.network.connect(device)
        deadline = time.monotonic() + timeout
        for device in self.devices:
            if not device.connected.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{device.report.device_id} could not connect to {self.settings.mqtt_url}")

    def _publish(self, device: _Device, suffix: str, payload: bytes) -> None:
        # While disconnected paho keeps QoS 1 messages in its queue (rc MQTT_ERR_NO_CONN) and sends
        # them on reconnect: the device's local buffer. Only a full queue refuses one.
        info = device.client.publish(f"devices/{device.report.device_id}/{suffix}", payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            device.report.buffer_overflows += 1
            return
        with device.lock:
            device.published += 1

    def _send_one(self, device: _Device, now_ms: int) -> None:
        cfg, report, rng = self.config, device.report, device.rng
        if cfg.malformed_ratio and rng.random() < cfg.malformed_ratio:
            self._publish(device, "telemetry", malformed_payload(rng.choice(MALFORMED_KINDS), report.device_id, rng, now_ms))
            report.malformed += 1
        seq = device.seq
        device.seq += 1
        payload = json.dumps({
            "device_id": report.device_id,
            "msg_id": f"{report.device_id}-{seq}-{rng.getrandbits(32):08x}",
            "seq": seq,
            "ts": now_ms,
            "metrics": {"temp": round(20 + 5 * rng.random(), 3), "hum": round(40 + 10 * rng.random(), 3)},
        }).encode()
        self._publish(device, "telemetry", payload)
        report.sent += 1
        report.first_seq = seq if report.first_seq is None else report.first_seq
        report.last_seq = seq
        if cfg.duplicate_ratio and rng.random() < cfg.duplicate_ratio:
            self._publish(device, "telemetry", payload)
            report.duplicates += 1

    def run(self, stop: threading.Event | None = None) -> dict[str, object]:
        """Connect, publish until the count or the duration is reached (or ``stop`` is set), wait
        for PUBACKs, disconnect."""
        cfg = self.config
        scheduler = threading.Thread(target=self._run_due, name="simulator-scheduler", daemon=True)
        scheduler.start()
        if cfg.register:
            self.registered = asyncio.run(provision(
                self.settings, [d.report.device_id for d in self.devices], device_type="simulated",
                firmware_version=cfg.firmware.version if cfg.firmware else None))
        self.authenticate()
        self.connect()
        started = time.monotonic()
        interval = 1.0 / cfg.rate_per_device
        next_heartbeat = started
        tick = 0
        last_progress = started
        while True:
            now = time.monotonic()
            if cfg.duration_s is not None and now - started >= cfg.duration_s:
                break
            if cfg.messages_per_device is not None and tick >= cfg.messages_per_device:
                break
            if stop is not None and stop.is_set():
                break
            now_ms = int(time.time() * 1000)
            for device in self.devices:
                if not self._quiet(device, now):
                    self._send_one(device, now_ms)
            if now >= next_heartbeat:
                for device in self.devices:
                    if self._quiet(device, now):
                        continue
                    self._publish(device, "heartbeat", json.dumps({"device_id": device.report.device_id, "ts": now_ms}).encode())
                next_heartbeat = now + cfg.heartbeat_s
            tick += 1
            if cfg.progress and now - last_progress >= 2.0:
                self._print_progress()
                last_progress = now
            sleep = started + tick * interval - time.monotonic()
            if sleep > 0:
                time.sleep(sleep)
        with self._due_changed:
            self._stop_scheduler = True
            self._due_changed.notify()
        scheduler.join(timeout=5)
        self._wait_for_acks(timeout=120)
        for device in self.devices:
            device.stopping = True
            device.client.disconnect()
        self.network.stop()
        return self.summary(time.monotonic() - started)

    def authenticate(self) -> None:
        """Give each device a new MQTT password, issued now (as an admin rotating them)."""
        with DynamicSecurity(self.settings, timeout_s=60.0) as control:
            credentials = control.issue(d.report.device_id for d in self.devices)
        for device in self.devices:
            device.client.username_pw_set(device.report.device_id, credentials[device.report.device_id])

    def _wait_for_acks(self, timeout: float) -> None:
        """Wait until the broker acknowledged every message the devices published (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.report.acked >= d.published for d in self.devices):
                return
            time.sleep(0.05)

    def _print_progress(self) -> None:
        sent = sum(d.report.sent for d in self.devices)
        acked = sum(d.report.acked for d in self.devices)
        connected = sum(d.connected.is_set() for d in self.devices)
        sys.stderr.write(f"\rsimulate: {sent} messages sent, {acked} acknowledged, {connected}/{len(self.devices)} connected ")
        sys.stderr.flush()

    def summary(self, elapsed_s: float) -> dict[str, object]:
        reports = [asdict(d.report) for d in self.devices]
        totals = {k: sum(r[k] for r in reports)
                  for k in ("sent", "duplicates", "malformed", "acked", "connection_losses", "connects", "buffer_overflows",
                            "commands", "duplicate_commands", "installs")}
        return {"elapsed_s": round(elapsed_s, 3), "seed": self.config.seed, "totals": totals,
                "devices": {r["device_id"]: r for r in reports}}
