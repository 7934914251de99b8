"""docker/ is not run here (no Docker engine on these machines); these checks keep it true."""
from __future__ import annotations

from pathlib import Path

import yaml

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
