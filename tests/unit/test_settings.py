from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from iotflow.errors import SettingsError
from iotflow.settings import Settings, documented

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_point_at_the_local_stack():
    settings = Settings.from_env({})
    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert settings.pg_dsn == "postgresql://iotflow:iotflow@127.0.0.1:15432/iotflow"
    assert settings.tsdb_dsn == settings.pg_dsn
    assert settings.redis_url == "redis://127.0.0.1:16379/0"
    assert settings.mqtt_url == "mqtt://127.0.0.1:11883"
    assert (settings.web_host, settings.web_port) == ("127.0.0.1", 6066)
    assert settings.store == "rocksdb"


def test_good_values_are_parsed_into_their_types():
    settings = Settings.from_env(
        {
            "IOTFLOW_WEB_PORT": "7001",
            "IOTFLOW_TOPIC_PARTITIONS": "16",
            "IOTFLOW_REPLICATION_FACTOR": "3",
            "IOTFLOW_MIN_INSYNC_REPLICAS": "2",
            "IOTFLOW_PG_COMMAND_TIMEOUT_S": "2.5",
            "IOTFLOW_KAFKA_BOOTSTRAP": "10.0.0.1:9092, 10.0.0.2:9092",
            "IOTFLOW_STORE": "MEMORY",
            "IOTFLOW_DATA_DIR": "/var/lib/iotflow",
            "IOTFLOW_PROCESSING_GUARANTEE": "exactly_once",
        }
    )
    assert settings.web_port == 7001
    assert settings.topic_partitions == 16
    assert (settings.replication_factor, settings.min_insync_replicas) == (3, 2)
    assert settings.pg_command_timeout_s == 2.5
    assert settings.kafka_bootstrap == "10.0.0.1:9092,10.0.0.2:9092"
    assert settings.store == "memory"
    assert settings.worker_dir == Path("/var/lib/iotflow")
    assert settings.processing_guarantee == "exactly_once"


def test_worker_dir_defaults_to_one_folder_per_web_port():
    assert Settings.from_env({"IOTFLOW_WEB_PORT": "6067"}).worker_dir == Path(".iotflow/worker-6067")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("IOTFLOW_WEB_PORT", "abc", "a TCP port number"),
        ("IOTFLOW_WEB_PORT", "0", "a TCP port number"),
        ("IOTFLOW_WEB_PORT", "70000", "a TCP port number"),
        ("IOTFLOW_TOPIC_PARTITIONS", "0", "a positive integer"),
        ("IOTFLOW_TOPIC_PARTITIONS", "-3", "a positive integer"),
        ("IOTFLOW_TOPIC_PARTITIONS", "1.5", "a positive integer"),
        ("IOTFLOW_PG_COMMAND_TIMEOUT_S", "0", "a positive number of seconds"),
        ("IOTFLOW_PG_COMMAND_TIMEOUT_S", "nan", "a positive number of seconds"),
        ("IOTFLOW_PG_COMMAND_TIMEOUT_S", "inf", "a positive number of seconds"),
        ("IOTFLOW_REDIS_TIMEOUT_S", "soon", "a positive number of seconds"),
        ("IOTFLOW_KAFKA_BOOTSTRAP", "localhost", "host:port"),
        ("IOTFLOW_KAFKA_BOOTSTRAP", "a:1,b:x", "host:port"),
        ("IOTFLOW_PG_DSN", "mysql://u@h/db", "a postgresql:// URL with a host"),
        ("IOTFLOW_TSDB_DSN", "postgresql://u@h1:5432,h2:99999/db", "a postgresql:// URL with a host"),
        ("IOTFLOW_REDIS_URL", "redis://", "a URL with scheme redis or rediss and a host"),
        ("IOTFLOW_REDIS_URL", "redis+sentinel://127.0.0.1:26379", "redis+sentinel://host:port,…/<master name>"),
        ("IOTFLOW_REDIS_URL", "redis+sentinel://127.0.0.1:x/mymaster/0", "redis+sentinel://host:port,…/<master name>"),
        ("IOTFLOW_MQTT_URL", "mqtt://broker:port", "a URL with scheme mqtt or mqtts"),
        ("IOTFLOW_STORE", "postgres", "one of rocksdb, memory"),
        ("IOTFLOW_LOG_LEVEL", "loud", "one of debug, info"),
        ("IOTFLOW_APP_ID", "  ", "a non-empty string"),
        ("IOTFLOW_PROCESSING_GUARANTEE", "maybe", "one of at_least_once, exactly_once"),
        ("IOTFLOW_TABLE_STANDBY_REPLICAS", "-1", "a whole number (0 or more)"),
        ("IOTFLOW_TABLE_STANDBY_REPLICAS", "one", "a whole number (0 or more)"),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_what_was_expected(variable, value, expected):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert variable in message
    assert repr(value) in message
    assert expected in message
    assert "\n" not in message


def test_an_unknown_iotflow_variable_is_refused_so_typos_do_not_go_unnoticed():
    with pytest.raises(SettingsError, match="IOTFLOW_WEB_PROT"):
        Settings.from_env({"IOTFLOW_WEB_PROT": "7000"})


def test_standby_replicas_may_be_turned_off():
    assert Settings.from_env({"IOTFLOW_TABLE_STANDBY_REPLICAS": "0"}).table_standby_replicas == 0
    assert Settings().table_standby_replicas == 1  # Faust's default: a worker taking over has the table


def test_variables_without_the_prefix_are_ignored():
    assert Settings.from_env({"PATH": "/bin", "WEB_PORT": "x"}) == Settings()


def test_min_insync_replicas_cannot_exceed_the_replication_factor():
    with pytest.raises(SettingsError, match="IOTFLOW_MIN_INSYNC_REPLICAS"):
        Settings.from_env({"IOTFLOW_REPLICATION_FACTOR": "1", "IOTFLOW_MIN_INSYNC_REPLICAS": "2"})


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.web_port = 1  # type: ignore[misc]


def test_every_variable_is_documented_in_the_readme_with_its_default():
    readme = README.read_text()
    for variable, default, _ in documented():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{variable}`")), None)
        assert row is not None, f"{variable} is missing from README's configuration table"
        if default:
            assert f"`{default}`" in row, f"README gives another default for {variable}"


def test_a_multi_host_postgresql_dsn_is_accepted_for_failover():
    dsn = "postgresql://iotflow@pg-a:5432,pg-b:5433/iotflow?target_session_attrs=read-write"
    assert Settings.from_env({"IOTFLOW_PG_DSN": dsn, "IOTFLOW_TSDB_DSN": dsn}).pg_dsn == dsn


def test_a_sentinel_url_names_the_sentinels_and_the_master():
    url = "redis+sentinel://:secret@127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381/iotflow/2"
    assert Settings.from_env({"IOTFLOW_REDIS_URL": url}).redis_url == url


def test_a_secret_can_come_from_a_file_and_its_content_is_never_shown(tmp_path):
    secret = "file-secret-" + "z" * 30
    (tmp_path / "jwt").write_text(secret + "\n")
    (tmp_path / "previous").write_text(f"k0={'p' * 32},k00={'q' * 40}\n")
    settings = Settings.from_env({"IOTFLOW_JWT_SECRET_FILE": str(tmp_path / "jwt"), "IOTFLOW_JWT_KID": "k2",
                                  "IOTFLOW_JWT_PREVIOUS_KEYS_FILE": str(tmp_path / "previous")})
    assert settings.jwt_secret == secret and settings.jwt_keys.previous == {"k0": "p" * 32, "k00": "q" * 40}
    assert secret not in repr(settings) and "p" * 32 not in repr(settings)

    (tmp_path / "short").write_text("short-secret")
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"IOTFLOW_JWT_SECRET_FILE": str(tmp_path / "short")})
    assert "short-secret" not in str(caught.value) and "IOTFLOW_JWT_SECRET" in str(caught.value)
    with pytest.raises(SettingsError, match="either IOTFLOW_JWT_SECRET or IOTFLOW_JWT_SECRET_FILE"):
        Settings.from_env({"IOTFLOW_JWT_SECRET_FILE": str(tmp_path / "jwt"), "IOTFLOW_JWT_SECRET": secret})
    with pytest.raises(SettingsError, match="a readable file .* for IOTFLOW_JWT_SECRET_FILE"):
        Settings.from_env({"IOTFLOW_JWT_SECRET_FILE": str(tmp_path / "missing")})
    # Only secrets come from files: anything else with _FILE is an unknown variable.
    with pytest.raises(SettingsError, match="IOTFLOW_WEB_PORT_FILE"):
        Settings.from_env({"IOTFLOW_WEB_PORT_FILE": str(tmp_path / "jwt")})


@pytest.mark.parametrize("value", ["k0=short", "k0", "bad kid=" + "x" * 32, f"k0={'x' * 32},k0={'y' * 32}"])
def test_previous_keys_that_cannot_work_are_refused_without_showing_them(value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"IOTFLOW_JWT_PREVIOUS_KEYS": value})
    assert "x" * 32 not in str(caught.value) and "IOTFLOW_JWT_PREVIOUS_KEYS" in str(caught.value)


def test_the_current_key_id_cannot_also_be_a_previous_one():
    with pytest.raises(SettingsError, match="IOTFLOW_JWT_KID"):
        Settings.from_env({"IOTFLOW_JWT_PREVIOUS_KEYS": f"k1={'x' * 32}"})
