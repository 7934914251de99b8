"""The local stack: Apache Kafka (KRaft), PostgreSQL, Redis and Mosquitto as loopback processes.

``iotflow stack up|down|status`` drives it. Every service keeps its data under one folder
(``IOTFLOW_STACK_DIR``, default ``.stack``) and its log under ``<stack>/logs``; ports come from
the same settings the app uses, so the stack and the app cannot disagree. ``up`` is idempotent
and returns only when each service answers a real request; ``down`` keeps all data.
"""
from __future__ import annotations

from iotflow.stack.base import Service, ServiceStatus, StackPaths
from iotflow.stack.kafka import Kafka
from iotflow.stack.mosquitto import Mosquitto
from iotflow.stack.postgres import Postgres
from iotflow.stack.redis import Redis
from iotflow.settings import Settings

__all__ = ["Service", "ServiceStatus", "StackPaths", "services"]

ORDER = ("postgres", "kafka", "redis", "mosquitto")


def services(settings: Settings) -> dict[str, Service]:
    """The stack's services in start order (stop in reverse)."""
    paths = StackPaths.at(settings.stack_dir)
    built: dict[str, Service] = {
        "postgres": Postgres(paths, settings),
        "kafka": Kafka(paths, settings),
        "redis": Redis(paths, settings),
        "mosquitto": Mosquitto(paths, settings),
    }
    return {name: built[name] for name in ORDER}
