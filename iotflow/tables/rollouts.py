"""The rollout-progress table: rollout id → the latest progress snapshot (JSON) the leader's
orchestrator published to ``rollout-progress``; served by ``GET /rollouts/{id}/progress``."""
from __future__ import annotations

import faust

from iotflow.settings import Settings
from iotflow.tables import bytes_table

PROGRESS = "rollout-progress"


def progress(app: faust.App, settings: Settings) -> faust.Table:
    return bytes_table(app, settings, PROGRESS, "Rollout progress: each rollout's latest snapshot, from rollout-progress.")
