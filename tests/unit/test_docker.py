"""docker/ is not run here (no Docker engine on these machines); these checks keep it true."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from iotflow.mqtt_auth import acl_file_text
from iotflow.settings import Settings
from iotflow.stack.kafka import kafka_version

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_runs_the_stack_and_a_worker():
    assert {"kafka", "postgres", "redis", "mosquitto", "worker"} <= set(compose()["services"])


def test_the_worker_environment_is_valid_iotflow_configuration():
    env = compose()["services"]["worker"]["environment"]
    assert all(name.startswith("IOTFLOW_") for name in env)
    settings = Settings.from_env({k: str(v) for k, v in env.items()})
    assert settings.kafka_bootstrap == "kafka:9092"


def test_compose_kafka_is_the_version_pinned_in_the_pom():
    assert compose()["services"]["kafka"]["image"] == f"apache/kafka:{kafka_version()}"


def test_the_image_runs_a_faust_worker_of_iotflow():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert 'CMD ["faust", "-A", "iotflow", "worker", "-l", "info"]' in dockerfile
    assert "-c constraints.txt" in dockerfile


def test_the_image_carries_the_migrations_where_the_workers_look_for_them():
    # The readiness check and `iotflow migrate up` read schema/ (iotflow.migrate.default_dir: beside
    # the package, else in the working folder); an image without it would migrate nothing and
    # report every schema current.
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY schema ./schema" in dockerfile


def production() -> dict:
    return yaml.safe_load((DOCKER / "compose.production.yaml").read_text())


def docker_compose_config(name: str) -> subprocess.CompletedProcess:
    # Debian's docker-compose (installed by scripts/bootstrap) validates the file; no engine needed.
    return subprocess.run(["docker-compose", "-f", str(DOCKER / name), "config", "-q"],
                          capture_output=True, text=True, timeout=60)


def test_docker_compose_accepts_both_compose_files():
    for name in ("compose.yaml", "compose.production.yaml"):
        done = docker_compose_config(name)
        assert done.returncode == 0, (name, done.stderr)


def test_production_kafka_is_three_kraft_brokers_with_rf_3_and_min_isr_2():
    services = production()["services"]
    brokers = {name: svc for name, svc in services.items() if name.startswith("kafka-")}
    assert len(brokers) == 3
    for name, broker in brokers.items():
        env = broker["environment"]
        assert broker["image"] == f"apache/kafka:{kafka_version()}"
        assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == ("3", "2")
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert sorted(v.split("@")[1].split(":")[0] for v in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == sorted(brokers)


def test_production_workers_and_bridges_are_valid_iotflow_configuration_pointing_at_the_services():
    services = production()["services"]
    workers = [n for n in services if n.startswith("worker-")]
    bridges = [n for n in services if n.startswith("bridge-")]
    assert len(workers) == 2 and len(bridges) == 2
    for name in workers + bridges:
        settings = Settings.from_env({k: str(v) for k, v in services[name]["environment"].items()})
        assert (settings.replication_factor, settings.min_insync_replicas) == (3, 2)
        assert {h.split(":")[0] for h in settings.kafka_bootstrap.split(",")} == {"kafka-1", "kafka-2", "kafka-3"}
        sentinels = settings.redis_url.split("//")[1].split("/")[0].split(",")
        assert {s.split(":")[0] for s in sentinels} == {n for n in services if n.startswith("sentinel-")}
    assert len({services[n]["environment"]["IOTFLOW_BRIDGE_CLIENT_ID"] for n in bridges}) == 2
    for name in workers:
        assert services[name]["environment"]["IOTFLOW_WEB_HOST"] == name  # forwarded table views reach it


def test_production_prometheus_scrapes_every_worker_with_the_rules_and_grafana_has_the_dashboards():
    services = production()["services"]
    monitoring = DOCKER.parent / "monitoring"
    config = yaml.safe_load((monitoring / "prometheus/prometheus.production.yml").read_text())
    jobs = {job["job_name"]: {t for c in job["static_configs"] for t in c["targets"]} for job in config["scrape_configs"]}
    assert jobs["iotflow-worker"] == {f"{n}:{services[n]['environment']['IOTFLOW_WEB_PORT']}"
                                      for n in services if n.startswith("worker-")}
    bridges = [n for n in services if n.startswith("bridge-")]
    assert jobs["iotflow-bridge"] == {f"{n}:{Settings.from_env(services[n]['environment']).bridge_metrics_port}" for n in bridges}
    assert all(services[n]["environment"]["IOTFLOW_WEB_HOST"] == "0.0.0.0" for n in bridges)  # reachable
    assert all((monitoring / "prometheus" / rules).is_file() for rules in config["rule_files"])
    assert services["prometheus"]["command"] == ["--config.file=/etc/prometheus/prometheus.production.yml"]
    grafana = " ".join(services["grafana"]["volumes"])
    assert "../monitoring/grafana/dashboards:/var/lib/grafana/dashboards" in grafana
    provider = yaml.safe_load((monitoring / "grafana/provisioning/dashboards/iotflow.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_image_is_non_root_with_a_health_check_on_liveness():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "USER iotflow" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/health/live" in dockerfile


def test_both_brokers_refuse_anonymous_clients_and_use_the_generated_device_acl():
    conf = (DOCKER / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf and "acl_file /mosquitto/config/device-acl.conf" in conf
    assert any(line.startswith("plugin ") and line.endswith("mosquitto_dynamic_security.so") for line in conf)
    assert (DOCKER / "device-acl.conf").read_text() == acl_file_text()
    for services in (compose()["services"], production()["services"]):
        assert "./device-acl.conf:/mosquitto/config/device-acl.conf:ro" in services["mosquitto"]["volumes"]
        assert services["mqtt-setup"]["command"] == ["iotflow", "mqtt", "setup"]
        admin = services["mosquitto"]["environment"]["IOTFLOW_MQTT_ADMIN_PASSWORD"]
        for name, service in services.items():
            if name.startswith(("worker", "bridge")):
                assert service["depends_on"]["mqtt-setup"] == {"condition": "service_completed_successfully"}
                env = {k: str(v) for k, v in service["environment"].items()}
                assert Settings.from_env(env).mqtt_admin_password == admin


def test_production_mqtt_is_tls_only():
    conf = (DOCKER / "mosquitto.production.conf").read_text().splitlines()
    listeners = [line for line in conf if line.startswith("listener ")]
    assert listeners == ["listener 8883 0.0.0.0"]
    assert {"cafile /mosquitto/certs/ca.crt", "certfile /mosquitto/certs/server.crt",
            "keyfile /mosquitto/certs/server.key"} <= set(conf)
    services = production()["services"]
    assert "./mosquitto.production.conf:/mosquitto/config/mosquitto.conf:ro" in services["mosquitto"]["volumes"]
    for name, service in services.items():
        if name.startswith(("worker", "bridge", "mqtt-setup")):
            settings = Settings.from_env({k: str(v) for k, v in service["environment"].items()})
            assert settings.mqtt_require_tls and settings.mqtt_url == "mqtts://mosquitto:8883"
            assert f"./certs/ca.crt:{settings.mqtt_ca_file}:ro" in service["volumes"]
