"""iotflow: the telemetry pipeline and device-management plane of an IoT platform, on Faust.

``iotflow.app`` is the :class:`faust.App`, so ``faust -A iotflow worker -l info`` runs a worker.
It is built on first access, not on ``import iotflow``, so that the CLI and the plain-logic
modules import without reading settings or touching the network.
"""
from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from iotflow.app import app

        # Importing the submodule bound ``iotflow.app`` to the module; rebind it to the App,
        # which is what ``faust -A iotflow`` (and every later reader) looks up.
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'iotflow' has no attribute {name!r}")
