"""The API's signing keys on a real worker: read from files, rotated with overlap, never logged —
nor the MQTT passwords it issues and uses."""
from __future__ import annotations

from pathlib import Path

import pytest

from iotflow import auth
from iotflow.settings import Settings
from iotflow.testing import http_json

pytestmark = pytest.mark.timeout(240)

OLD, NEW = "old-signing-key-" + "o" * 24, "new-signing-key-" + "n" * 24


def _token(secret: str, kid: str, settings: Settings, role: str = "admin") -> dict[str, str]:
    token = auth.issue(secret, role=role, subject="rotation-test", ttl_s=600, issuer=settings.jwt_issuer,
                       audience=settings.jwt_audience, kid=kid)
    return {"Authorization": f"Bearer {token}"}


def test_a_rotated_key_keeps_old_tokens_valid_until_it_is_retired_and_no_secret_is_logged(
        settings: Settings, start_worker, tmp_path: Path, run_id: str):
    (tmp_path / "jwt").write_text(NEW + "\n")
    (tmp_path / "previous").write_text(f"k1={OLD}\n")
    worker = start_worker(IOTFLOW_JWT_SECRET_FILE=str(tmp_path / "jwt"), IOTFLOW_JWT_KID="k2",
                          IOTFLOW_JWT_PREVIOUS_KEYS_FILE=str(tmp_path / "previous"), IOTFLOW_LOG_LEVEL="debug")
    worker.wait_ready()
    devices = f"{worker.url}/api/v1/devices"
    old, new = _token(OLD, "k1", settings), _token(NEW, "k2", settings)
    status, _, registered = http_json("POST", devices, {"id": f"rot-{run_id}", "name": "n", "type": "t"}, headers=old)
    assert status == 201
    device_password = registered["mqtt"]["password"]
    rotated = http_json("POST", f"{devices}/rot-{run_id}/credentials", headers=old)[2]["mqtt"]["password"]
    assert http_json("GET", f"{devices}/rot-{run_id}", headers=new)[0] == 200
    status, _, problem = http_json("GET", devices, headers=_token(OLD, "k2", settings))  # old key, new id
    assert status == 401 and "Signature verification failed" in problem["detail"]
    status, _, problem = http_json("GET", devices, headers=_token(NEW, "k9", settings))
    assert status == 401 and "'k9', which is not (or no longer) accepted" in problem["detail"]
    worker.terminate()

    # The old key retired: its tokens are refused, the new key's still work.
    (tmp_path / "previous").write_text("")
    worker.start()
    worker.wait_ready()
    status, _, problem = http_json("GET", devices, headers=old)
    assert status == 401 and "'k1', which is not (or no longer) accepted" in problem["detail"]
    assert http_json("GET", f"{devices}/rot-{run_id}", headers=new)[0] == 200
    worker.terminate()

    log = Path(worker.log_path).read_text(errors="replace")  # both runs, at debug level
    for secret in (OLD, NEW, old["Authorization"].split()[1], new["Authorization"].split()[1], device_password,
                   rotated, settings.mqtt_admin_password, settings.mqtt_platform_password):
        assert secret not in log
