"""``iotflow rollout watch ID``: a rollout's progress in the terminal, a bar per wave and per state,
redrawn every second until the rollout ends (read from PostgreSQL, as the API reads it)."""
from __future__ import annotations

import asyncio
import sys
from typing import Any

from iotflow.pg import LazyPool
from iotflow.registry import DeviceRegistry
from iotflow.rollout_store import RolloutStore
from iotflow.rollouts import PROGRESS, DeviceState
from iotflow.settings import Settings

_ENDED = {"completed", "aborted", "canceled"}
_ORDER = [s.value for s in PROGRESS] + ["FAILED", "TIMED_OUT", "REJECTED", "CANCELED"]
_BAR = ["SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED"] + [s.value for s in reversed(PROGRESS[:-1])]
_MARK = {"SUCCEEDED": "#", "FAILED": "x", "TIMED_OUT": "t", "REJECTED": "r", "CANCELED": "-", "QUEUED": "."}


def bar(by_state: dict[str, int], size: int, width: int) -> str:
    """``width`` characters: a run per state, ended ones first (``#`` succeeded, ``x`` failed,
    ``t`` timed out, ``r`` rejected, ``-`` canceled), then ``~`` in progress and ``.`` queued."""
    if size <= 0:
        return " " * width
    cells = [_MARK.get(state, "~") * round(width * by_state.get(state, 0) / size) for state in _BAR]
    text = "".join(cells)[:width]
    return text + " " * (width - len(text))


def render(rollout: dict[str, Any], width: int = 40) -> str:
    lines = [f"rollout {rollout['id']}  firmware {rollout['firmware_version']}  {rollout['status']}"
             + (f" ({rollout['abort_reason']})" if rollout.get("abort_reason") else "")]
    total = rollout["devices"]
    done = sum(n for state, n in rollout["by_state"].items() if DeviceState(state).terminal)
    eta = f"  eta {rollout['eta_s']} s" if rollout.get("eta_s") is not None else ""
    lines.append(f"all     [{bar(rollout['by_state'], total, width)}] {done}/{total} ended, "
                 f"{rollout.get('unhealthy', 0)} unhealthy, {rollout.get('rate_per_min', 0):g}/min{eta}")
    for wave in rollout["waves"]:
        ended = sum(n for state, n in wave["by_state"].items() if DeviceState(state).terminal)
        opened = "*" if wave["wave"] == rollout.get("current_wave") else " "
        lines.append(f"wave {wave['wave']:>2}{opened}[{bar(wave['by_state'], wave['size'], width)}] {ended}/{wave['size']}")
    states = "  ".join(f"{state} {rollout['by_state'][state]}" for state in _ORDER if rollout["by_state"].get(state))
    lines.append(states)
    return "\n".join(lines)


async def watch(settings: Settings, rollout_id: str, interval_s: float, once: bool) -> dict[str, Any]:
    pool = LazyPool(settings.pg_dsn, size=1, connect_timeout_s=settings.pg_connect_timeout_s,
                    command_timeout_s=settings.pg_command_timeout_s, application_name="iotflow-rollout-watch")
    store = RolloutStore(DeviceRegistry(pool))
    drawn = 0
    try:
        while True:
            rollout = await store.get(rollout_id)
            text = render(rollout)
            if drawn and sys.stdout.isatty():
                sys.stdout.write(f"\x1b[{drawn}F\x1b[J")  # up over the last drawing, clear below
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            drawn = text.count("\n") + 1
            if once or rollout["status"] in _ENDED:
                return rollout
            await asyncio.sleep(interval_s)
    finally:
        await pool.close()
