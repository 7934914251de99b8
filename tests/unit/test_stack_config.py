from __future__ import annotations

import re
import socket
import uuid
from pathlib import Path

import pytest

from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.stack import services
from iotflow.stack import base
from iotflow.stack.base import StackPaths, free_loopback_port, log_tail, loopback_port
from iotflow.stack.kafka import kafka_version, new_cluster_id, server_properties
from iotflow.stack.mosquitto import Mosquitto


def test_the_kafka_version_is_pinned_once_in_the_pom():
    assert re.fullmatch(r"\d+\.\d+\.\d+", kafka_version())


def test_server_properties_run_one_kraft_node_on_loopback(tmp_path: Path):
    text = server_properties(node_id=1, port=19092, controller_port=19093, data_dir=tmp_path)
    props = dict(line.split("=", 1) for line in text.splitlines() if line)
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["log.dirs"] == str(tmp_path)
    assert props["auto.create.topics.enable"] == "false"


def test_a_node_of_a_three_node_cluster_names_every_voter_and_keeps_internal_topics_on_three(tmp_path: Path):
    text = server_properties(node_id=2, port=30002, controller_port=31002, data_dir=tmp_path,
                             voters={1: 31001, 2: 31002, 3: 31003})
    props = dict(line.split("=", 1) for line in text.splitlines() if line)
    assert props["controller.quorum.voters"] == "1@127.0.0.1:31001,2@127.0.0.1:31002,3@127.0.0.1:31003"
    assert "controller.quorum.bootstrap.servers" not in props
    assert (props["offsets.topic.replication.factor"], props["default.replication.factor"],
            props["min.insync.replicas"], props["transaction.state.log.min.isr"]) == ("3", "3", "2", "2")
    single = dict(line.split("=", 1) for line in server_properties(
        node_id=1, port=19092, controller_port=19093, data_dir=tmp_path).splitlines() if line)
    assert (single["offsets.topic.replication.factor"], single["min.insync.replicas"]) == ("1", "1")


@pytest.mark.parametrize("address", ["127.0.0.1:9092", "localhost:9092", "redis://127.0.0.1:9092/0"])
def test_loopback_ports_are_accepted(address):
    assert loopback_port("X", address) == 9092


@pytest.mark.parametrize("address", ["10.1.2.3:9092", "postgresql://db.example:5432/x", "redis://127.0.0.1/0"])
def test_the_stack_refuses_addresses_it_cannot_serve(address):
    with pytest.raises(StackError, match="X="):
        loopback_port("X", address)


def test_services_take_their_ports_from_the_app_settings(tmp_path: Path):
    settings = Settings(
        stack_dir=tmp_path,
        kafka_bootstrap="127.0.0.1:29092",
        redis_url="redis://127.0.0.1:26379/0",
        mqtt_url="mqtt://127.0.0.1:21883",
        pg_dsn="postgresql://u:p@127.0.0.1:25432/db",
        tsdb_dsn="postgresql://u:p@127.0.0.1:25432/ts",
    )
    stack = services(settings)
    assert list(stack) == ["postgres", "kafka", "redis", "mosquitto"]
    assert stack["kafka"].status().address == "127.0.0.1:29092"
    assert "listener 21883 127.0.0.1" in Mosquitto(StackPaths.at(tmp_path), settings).config_text()


def test_the_local_broker_refuses_anonymous_clients_and_checks_devices_topics(tmp_path: Path):
    broker = Mosquitto(StackPaths.at(tmp_path), Settings(stack_dir=tmp_path))
    lines = broker.config_text().splitlines()
    assert "allow_anonymous false" in lines and "allow_anonymous true" not in lines
    assert f"plugin {broker.plugin_path()}" in lines  # Debian's mosquitto ships the plugin
    assert f"plugin_opt_config_file {broker.dynsec_file}" in lines
    assert f"acl_file {broker.acl_file}" in lines


def test_one_postgres_serves_both_dsns(tmp_path: Path):
    settings = Settings(
        stack_dir=tmp_path,
        pg_dsn="postgresql://u:p@127.0.0.1:25432/db",
        tsdb_dsn="postgresql://u:p@127.0.0.1:25433/ts",
    )
    with pytest.raises(StackError, match="one PostgreSQL"):
        services(settings)


def test_cached_kafka_jars_are_not_resolved_again(tmp_path: Path, monkeypatch):
    kafka = services(Settings(stack_dir=tmp_path))["kafka"]
    kafka.libs.mkdir(parents=True)
    (kafka.libs.parent / ".complete").touch()
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn reachable: resolving would fail
    kafka.ensure_jars()
    assert not (kafka.home / "build").exists()



def test_a_cluster_id_never_starts_with_a_dash_the_storage_tool_would_read_as_an_option(monkeypatch):
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x10" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))
    cluster_id = new_cluster_id()
    assert cluster_id == "EBAQEBAQEBAQEBAQEBAQEA"  # the second draw: the first encodes as "-AAA…"


def test_free_ports_come_from_below_the_ephemeral_range_free_and_never_twice():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_loopback_port(span=2) for _ in range(50)]
    assert all(20000 <= port and port + 1 < low for port in ports)
    handed_out = [p for port in ports for p in (port, port + 1)]
    assert len(set(handed_out)) == len(handed_out)
    for port in handed_out[:10]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_is_bound_to_is_not_handed_out(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(base, "_BELOW_EPHEMERAL", (taken, taken + 2))
        assert free_loopback_port() == taken + 1


def test_a_log_tail_is_the_end_of_the_log_or_says_there_is_none(tmp_path: Path):
    log = tmp_path / "server.log"
    log.write_text("x" * 5000 + "ERROR Address already in use\n")
    assert log_tail(log, chars=40).endswith("ERROR Address already in use\n")
    assert len(log_tail(log, chars=40)) == 40
    assert "no log at" in log_tail(tmp_path / "missing.log")
