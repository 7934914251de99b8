"""The TimescaleDB branch of the schema, applied on a real TimescaleDB engine.

No TimescaleDB server package exists for these machines; PGlite (PostgreSQL compiled to WASM)
with the TimescaleDB 2.23 extension, from npm, runs the same DDL in Node. It cannot carry the
write path (design.md), so this proves the DDL — hypertable, chunks, compression, retention — and
the sink's one statement that must hold on a hypertable (the move that counts stored messages).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from iotflow.migrate import default_dir, discover
from iotflow.sinks import timescale

HERE = Path(__file__).resolve().parents[1] / "timescale"


def apply(*sql_files: Path) -> dict:
    node = shutil.which("node")
    assert node, "node is required (the machine has Node.js)"
    assert (HERE / "node_modules").is_dir(), "run scripts/bootstrap (it installs tests/timescale)"
    env = {**os.environ, "SINK_STAGE": timescale.CREATE_STAGE, "SINK_MOVE": timescale.MOVE}
    done = subprocess.run([node, "apply.mjs", *map(str, sql_files)], cwd=HERE, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_measurements_become_a_compressed_hypertable_whose_days_the_archive_drops_on_timescaledb():
    migrations = discover(default_dir())
    report = apply(*(m.up for m in migrations))
    assert report["extension"][0]["extname"] == "timescaledb"
    assert report["hypertables"] == [{"hypertable_name": "sensor_measurements", "compression_enabled": True}]
    assert report["dimensions"] == [{"column_name": "time", "chunk_interval": "1 day"}]
    jobs = {job["proc_name"]: json.loads(job["config"]) for job in report["jobs"]}
    assert jobs["policy_compression"]["compress_after"] == "7 days"
    # No blind retention: the archive job drops a day once it is archived (docs/archive.md).
    assert "policy_retention" not in jobs
    assert report["archive"] == {"days_before": ["2026-01-10", "2026-01-11"], "refused": False, "dropped": True,
                                 "days_after": ["2026-01-11"], "rows_after": 1}
    assert report["segmentby"] == [{"attname": "device_id", "segmentby_column_index": 1}]
    # The sink's move into the hypertable counts each new message once per device (0007); a replay adds nothing.
    assert report["sink"] == {"first": 3, "replay": 0, "counted": [{"device_id": "d2", "messages": 2}]}
    # The plain-PostgreSQL partition upkeep is a no-op on a hypertable.
    assert report["partitions_made"] == [{"made": 0}]


@pytest.mark.timeout(600)
def test_the_timescaledb_schema_rolls_down_and_up_again():
    migrations = discover(default_dir())
    steps = [m.up for m in migrations] + [m.down for m in reversed(migrations)] + [m.up for m in migrations]
    report = apply(*steps)
    assert [h["hypertable_name"] for h in report["hypertables"]] == ["sensor_measurements"]
