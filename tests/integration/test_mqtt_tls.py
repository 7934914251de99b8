"""MQTT over TLS on the local stack's second listener, its certificate from the stack's throwaway
CA: a fleet and a bridge that speak only TLS deliver every message; a client that does not trust
the CA, or speaks plain MQTT to the TLS port, never gets in; the production profile refuses a
plain mqtt:// URL."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from iotflow.errors import SettingsError
from iotflow.mqtt_auth import account
from iotflow.settings import Settings
from iotflow.simulator import FleetConfig
from iotflow.stack.tls import TlsFiles, throwaway_ca
from iotflow.testing import mqtt_client, stored_messages, wait_for
from tests.integration.test_mqtt_path import FleetThroughBridge

pytestmark = pytest.mark.timeout(300)


def over_tls(settings: Settings) -> Settings:
    ca = TlsFiles.at(settings.stack_dir / "mosquitto" / "tls").ca
    return dataclasses.replace(settings, mqtt_url=f"mqtts://127.0.0.1:{settings.stack_mqtt_tls_port}",
                               mqtt_ca_file=str(ca.resolve()), mqtt_require_tls=True)


def test_a_fleet_and_a_bridge_speaking_only_tls_deliver_every_message(settings, start_worker, run_id, tmp_path):
    tls = over_tls(settings)
    run = FleetThroughBridge(tls, start_worker, run_id, tmp_path,
                             FleetConfig(devices=10, messages_per_device=100, rate_per_device=50.0, seed=3,
                                         prefix=f"tls{run_id}"),
                             IOTFLOW_MQTT_URL=tls.mqtt_url, IOTFLOW_MQTT_CA_FILE=tls.mqtt_ca_file,
                             IOTFLOW_MQTT_REQUIRE_TLS="true")
    try:
        run.sender.join(timeout=120)
        assert not run.sender.is_alive()
        sent = run.result["totals"]["sent"]
        assert sent == 1000
        assert wait_for(lambda: run.stored() == sent, timeout=120), f"stored {run.stored()} of {sent}"
        assert asyncio.run(stored_messages(settings, run.prefix)) == (2 * sent, sent)
    finally:
        run.stop()


# paho-mqtt 2.2 leaves the socket of a failed TLS handshake to the garbage collector (its
# _ssl_wrap_socket does not close it when do_handshake raises): the refusals below leak one each.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_only_clients_that_trust_the_ca_and_speak_tls_get_in(settings, run_id, tmp_path):
    tls = over_tls(settings)
    admin = account(settings, "admin")
    client = mqtt_client(tls, f"tls-ok-{run_id}", admin)  # the stack's CA, the broker's name checked
    client.disconnect()
    client.loop_stop()
    other_ca = throwaway_ca(tmp_path / "other").ca  # a CA that never signed the broker's certificate
    for refused in (dataclasses.replace(tls, mqtt_ca_file=str(other_ca)),
                    dataclasses.replace(tls, mqtt_ca_file=""),  # the system's CAs do not know it either
                    dataclasses.replace(tls, mqtt_url=tls.mqtt_url.replace("mqtts://", "mqtt://"),
                                        mqtt_require_tls=False)):  # plain MQTT to the TLS port
        with pytest.raises((OSError, TimeoutError)):
            mqtt_client(refused, f"tls-no-{run_id}", admin, timeout=5)


def test_the_production_profile_refuses_plain_mqtt():
    with pytest.raises(SettingsError, match="IOTFLOW_MQTT_URL"):
        Settings.from_env({"IOTFLOW_MQTT_REQUIRE_TLS": "true", "IOTFLOW_MQTT_URL": "mqtt://broker:1883"})
    assert Settings.from_env({"IOTFLOW_MQTT_REQUIRE_TLS": "true",
                              "IOTFLOW_MQTT_URL": "mqtts://broker:8883"}).mqtt_require_tls
