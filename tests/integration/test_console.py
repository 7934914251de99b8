"""The operator console in a real browser (Debian's headless Chromium, driven by playwright-core
from tests/console/drive.mjs) against a running worker, bridge and simulated fleet with a rollout
under way: the fleet lists and finds devices, a device's chart has points, the rollout's progress
advances and its Pause button pauses it, the pipeline shows its components, the page is
keyboard-reachable and fits a narrow screen, and the browser logs no error. Screenshots are kept
in the test's folder (``--basetemp`` to choose where)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from iotflow.testing import http_json
from tests.integration.test_rollouts import rig  # noqa: F401 - the fixture

DRIVER = Path(__file__).resolve().parents[1] / "console"


@pytest.mark.timeout(600)
def test_the_console_shows_the_fleet_a_device_chart_and_a_rollout_it_can_pause(rig, tmp_path):  # noqa: F811
    node = shutil.which("node")
    assert node, "node is required (the machine has Node.js)"
    assert (DRIVER / "node_modules" / "playwright-core").is_dir(), "run scripts/bootstrap (it installs tests/console)"
    assert Path("/usr/bin/chromium").exists(), "run scripts/bootstrap (it installs Debian's chromium)"
    r = rig(60, heartbeat_s=2.0)
    rollout = r.create({"firmware": r.publish("3.1.0"), "targets": {"devices": r.ids}, "waves": {"sizes": [60]},
                        "health_window_s": 0, "dispatch_per_s": 1})
    status, headers, page = http_json("GET", f"{r.worker.url}/console")
    assert status == 200 and page is None and headers["Content-Type"].startswith("text/html")
    # Scripts, styles and requests from this origin only: no inline code, no frames, no CDN.
    assert headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    token = r.worker.bearer("operator")["Authorization"].split()[1]
    admin = r.worker.bearer("admin")["Authorization"].split()[1]
    try:
        done = subprocess.run([node, "drive.mjs", r.worker.url, token, r.ids[0], rollout["id"], str(shots), admin],
                              cwd=DRIVER, capture_output=True, text=True, timeout=400)
    finally:  # the kill switch is global: never leave it on for the tests after this one
        assert http_json("PUT", f"{r.worker.url}/api/v1/flags/rollouts.kill_switch", {"enabled": False},
                         headers=r.admin)[0] == 200
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    (tmp_path / "seen.json").write_text(json.dumps(seen, indent=1))  # beside the screenshots

    assert seen["fleet_rows"] >= 25 and seen["searched"] == 1, seen  # a full first page; the search finds one
    assert seen["points"] >= 1, seen
    assert seen["succeeded_after"] > seen["succeeded_before"], seen  # progress advanced, live
    assert seen["status"] == "paused" and seen["resume_enabled"] and "Pause" in seen["dialog"], seen
    assert r.rollout(rollout["id"])["status"] == "paused"
    assert seen["components"] >= 4, seen  # the worker and each dependency, coloured by /health/ready
    # The kill switch: not an operator's to flip; an admin turns it on (confirmed) and off again.
    assert seen["kill_switch_operator_enabled"] is False, seen
    assert (seen["kill_switch_before"], seen["kill_switch_after"]) == ("off", "off"), seen
    assert seen["kill_switch_on"].startswith("ON"), seen
    assert ["kill switch ON" in seen["kill_dialogs"][0], "kill switch off" in seen["kill_dialogs"][1]] == [True, True], seen
    # Tab from the top: the sections, the search, then the device found; Enter on it opens it.
    assert seen["tab_stops"][:3] == ["Fleet", "Pipeline", "Rollouts"], seen["tab_stops"]
    assert "Search devices by id or name" in seen["tab_stops"] and seen["tab_stops"][-1] == r.ids[0], seen
    assert seen["opened_by_keyboard"] == f"#/devices/{r.ids[0]}", seen
    assert seen["narrow_overflow"] <= 0, seen
    assert seen["errors"] == [], seen
    assert {p.name for p in shots.iterdir()} >= {"fleet.png", "device.png", "rollout.png", "rollout-paused.png",
                                                  "kill-switch-on.png", "pipeline.png", "rollout-narrow.png"}
