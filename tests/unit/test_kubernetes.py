"""docker/kubernetes/ is not applied here (no cluster); these checks keep it true to the app."""
from __future__ import annotations

from pathlib import Path

import yaml

from iotflow.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "docker/kubernetes"


def documents() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def config() -> dict[str, str]:
    return documents()[("ConfigMap", "iotflow")]["data"]


def test_the_config_map_is_valid_iotflow_configuration_for_production():
    settings = Settings.from_env({**config(), "IOTFLOW_JWT_SECRET": "x" * 40})
    assert settings.replication_factor == 3 and settings.min_insync_replicas == 2
    assert "target_session_attrs=read-write" in settings.pg_dsn  # follows a promoted primary


def worker() -> dict:
    return documents()[("Deployment", "iotflow-worker")]["spec"]["template"]["spec"]


def test_the_worker_probes_the_real_health_paths_on_the_configured_port():
    container = worker()["containers"][0]
    assert container["command"] == ["faust", "-A", "iotflow", "worker", "-l", "info"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert str(port) == config()["IOTFLOW_WEB_PORT"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    from iotflow.app import create_app  # the paths are routes the app serves

    app = create_app(Settings.from_env({**config(), "IOTFLOW_JWT_SECRET": "x" * 40}))
    routes = {route.resource.canonical for route in app.web.web_app.router.routes()}
    assert {"/health/live", "/health/ready", "/metrics"} <= routes


def test_the_grace_period_outlasts_prestop_drain_and_flush():
    spec = worker()
    sleep = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(config()["IOTFLOW_SHUTDOWN_DRAIN_S"])
    flush = 10  # the ingest agent's longest final flush (iotflow/agents/ingest.py)
    assert spec["terminationGracePeriodSeconds"] > sleep + drain + flush + 10


def test_the_worker_runs_as_non_root_with_its_secret_from_a_secret():
    spec = worker()
    assert spec["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert "secretKeyRef" in env["IOTFLOW_JWT_SECRET"]["valueFrom"]


def test_disruption_budgets_and_autoscaling_match_their_workloads():
    docs = documents()
    for name in ("iotflow-worker", "iotflow-bridge"):
        workload = docs.get(("Deployment", name)) or docs[("StatefulSet", name)]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        budget = docs[("PodDisruptionBudget", name)]["spec"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
        assert budget["minAvailable"] < workload["spec"]["replicas"]
    hpa = docs[("HorizontalPodAutoscaler", "iotflow-worker")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "iotflow-worker"
    assert hpa["maxReplicas"] <= int(config()["IOTFLOW_TOPIC_PARTITIONS"])  # beyond it, workers idle


def test_bridges_keep_their_mqtt_session_across_restarts():
    bridge = documents()[("StatefulSet", "iotflow-bridge")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in bridge["env"]}
    assert env["IOTFLOW_BRIDGE_CLIENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_mqtt_is_tls_only_with_the_ca_mounted_and_each_account_from_the_secret():
    settings = Settings.from_env({**config(), "IOTFLOW_JWT_SECRET": "x" * 40})
    assert settings.mqtt_require_tls and settings.mqtt_url.startswith("mqtts://")
    bridge = documents()[("StatefulSet", "iotflow-bridge")]["spec"]["template"]["spec"]
    for spec, accounts in ((worker(), {"IOTFLOW_MQTT_ADMIN_PASSWORD", "IOTFLOW_MQTT_PLATFORM_PASSWORD"}),
                           (bridge, {"IOTFLOW_MQTT_BRIDGE_PASSWORD"})):
        container = spec["containers"][0]
        from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert accounts <= from_secret
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert settings.mqtt_ca_file == mounts["mqtt-ca"] + "/ca.crt"
        assert {v["name"]: v for v in spec["volumes"]}["mqtt-ca"]["secret"]["secretName"] == "iotflow-mqtt-ca"


def test_the_migrate_job_applies_the_schema_and_topics_with_the_workers_configuration():
    job = documents()[("Job", "iotflow-migrate")]["spec"]["template"]["spec"]
    container = job["containers"][0]
    assert container["command"][-1] == "iotflow migrate up && iotflow topics create"
    assert container["image"] == worker()["containers"][0]["image"]
    assert container["envFrom"] == worker()["containers"][0]["envFrom"]
    assert job["securityContext"]["runAsNonRoot"] is True
