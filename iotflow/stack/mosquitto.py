"""Mosquitto (Debian's package) on loopback, with persistence for QoS 1 sessions and the
dynamic-security plugin: no anonymous access; the platform's accounts and roles are set up by
``start`` from the settings, devices' accounts by the worker (iotflow/mqtt_auth.py). A second
listener serves the same broker over TLS with a certificate from a throwaway CA (iotflow/stack/tls.py)."""
from __future__ import annotations

import dataclasses
import getpass
import glob

from iotflow.errors import MqttAuthError, StackError
from iotflow.mqtt_auth import DynamicSecurity, account, acl_file_text, signs_in
from iotflow.settings import Settings
from iotflow.stack.base import (
    Service,
    ServiceStatus,
    StackPaths,
    loopback_port,
    read_pid,
    refuse_taken_ports,
    require_binary,
    run,
    stop_pid,
    wait_until,
)
from iotflow.stack.tls import TlsFiles, throwaway_ca


class Mosquitto(Service):
    name = "mosquitto"

    def __init__(self, paths: StackPaths, settings: Settings) -> None:
        self.paths = paths
        self.settings = settings
        self.port = loopback_port("IOTFLOW_MQTT_URL", settings.mqtt_url)
        self.tls_port = settings.stack_mqtt_tls_port
        self.home = paths.service_dir("mosquitto")
        self.config = self.home / "mosquitto.conf"
        self.pid_file = self.home / "mosquitto.pid"
        self.log_file = paths.logs / "mosquitto.log"
        self.dynsec_file = self.home / "dynamic-security.json"
        self.acl_file = self.home / "device-acl.conf"
        self.tls = TlsFiles.at(self.home / "tls")

    def config_text(self) -> str:
        return "\n".join(
            [
                f"listener {self.port} 127.0.0.1",
                "per_listener_settings false",
                "allow_anonymous false",
                f"plugin {self.plugin_path()}",
                f"plugin_opt_config_file {self.dynsec_file}",
                # Devices' topics by username (the plugin defers to these where no role has an ACL).
                f"acl_file {self.acl_file}",
                "persistence true",
                f"persistence_location {self.home}/data/",
                "autosave_interval 5",
                # Queue generously for persistent QoS 1 sessions while a bridge is down.
                "max_queued_messages 100000",
                "max_inflight_messages 1000",
                # Sessions of clients gone for an hour are dropped: a bridge or device that never
                # comes back would otherwise keep its queue (up to the bound above) for ever.
                "persistent_client_expiration 1h",
                f"log_dest file {self.log_file}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "connection_messages true",
                f"pid_file {self.pid_file}",
                # Mosquitto started as root switches to this user; keep the one that owns the folder.
                f"user {getpass.getuser()}",
                # The same broker over TLS, its certificate from the stack's throwaway CA.
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.cert}",
                f"keyfile {self.tls.key}",
                "",
            ]
        )

    def start(self) -> None:
        if self.status().up:
            return
        refuse_taken_ports(self.name, self.port, self.tls_port)
        broker = require_binary("mosquitto", "mosquitto")
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        if not self.dynsec_file.exists():
            # The plugin's file with its one admin account; everything else goes through $CONTROL.
            ctrl = require_binary("mosquitto_ctrl", "mosquitto")
            run([ctrl, "dynsec", "init", str(self.dynsec_file), self.settings.mqtt_admin_user,
                 self.settings.mqtt_admin_password], timeout=30, what="creating Mosquitto's dynamic-security file")
            self.dynsec_file.chmod(0o600)  # the accounts' password hashes
        self.acl_file.write_text(acl_file_text())
        throwaway_ca(self.tls.ca.parent)
        self.config.write_text(self.config_text())
        run([broker, "-c", str(self.config), "-d"], timeout=30, what="starting mosquitto")
        wait_until(self._answers, timeout=30, what=f"Mosquitto did not accept the admin account's connection "
                                                    f"(see {self.log_file}; {self.dynsec_file} keeps the admin "
                                                    f"password it was created with)")
        try:
            with DynamicSecurity(self.settings) as control:
                control.ensure_platform_accounts()
        except MqttAuthError as exc:
            raise StackError(f"setting up Mosquitto's platform accounts: {exc}") from exc

    @staticmethod
    def plugin_path() -> str:
        found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob("/usr/lib/mosquitto_dynamic_security.so"))
        if not found:
            raise StackError("mosquitto_dynamic_security.so not found: install Debian's mosquitto package (scripts/bootstrap)")
        return found[0]

    def stop(self) -> None:
        stop_pid(self.pid_file, name="mosquitto", timeout=30)

    def status(self) -> ServiceStatus:
        pid = read_pid(self.pid_file)
        up = pid is not None and self._answers()
        return ServiceStatus(self.name, up, f"127.0.0.1:{self.port}",
                             "Mosquitto" + (f", pid {pid}" if pid else "") + f", TLS on 127.0.0.1:{self.tls_port}")

    def _answers(self) -> bool:
        """True when the broker accepts the admin account's MQTT CONNECT (CONNACK success)."""
        plain = dataclasses.replace(self.settings, mqtt_url=f"mqtt://127.0.0.1:{self.port}",
                                    mqtt_require_tls=False)
        return signs_in(plain, account(self.settings, "admin"), timeout_s=3)
