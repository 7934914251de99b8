"""The worker class ``faust -A iotflow worker`` runs (the app's ``Worker`` setting): Faust's, with a
drain before it stops (R-17).

On SIGTERM (Kubernetes' preStop has run, the pod is being removed) the worker first *drains*:
``/health/ready`` answers 503 ``draining`` at once, so load balancers take it out of rotation,
while it keeps serving HTTP and ingesting for ``IOTFLOW_SHUTDOWN_DRAIN_S``. Then Faust's own stop
runs — after the ``before_stop`` hooks: the ingest pipeline stops taking messages, makes its
queued batch durable, acknowledges it and commits, so what the worker stored is exactly what it
committed — the web server stops listening and lets in-flight requests finish, the agents stop,
and the process exits 0. A second SIGTERM, or SIGINT, skips what is left of the drain.

Under ``exactly_once`` the worker starts without its local tables (:func:`discard_local_tables`):
a table write's changelog record is acknowledged — and applied to RocksDB — before its Kafka
transaction commits, so a worker killed in between leaves RocksDB holding writes the broker then
aborts. Restored from their changelogs (read committed) instead, the tables hold exactly what was
committed; Kafka Streams does the same after an unclean stop.
"""
from __future__ import annotations

import asyncio
import gc
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import faust
import structlog
from faust.types.enums import ProcessingGuarantee

log = structlog.get_logger(__name__)

BEFORE_STOP_TIMEOUT_S = 15.0


class Draining:
    """Whether the worker has been asked to stop (readiness reads it), and what must run once the
    drain is over, before Faust stops anything (``before_stop``: the ingest pipeline's close)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.before_stop: list[Callable[[], Awaitable[None]]] = []

    @property
    def active(self) -> bool:
        return self.since is not None


def draining(app: faust.App) -> Draining:
    """The app's drain state (one per app)."""
    state = getattr(app, "_iotflow_draining", None)
    if state is None:
        state = Draining()
        app._iotflow_draining = state  # type: ignore[attr-defined]
    return state


def discard_local_tables(app: faust.App) -> bool:
    """Under exactly_once, delete the worker's RocksDB tables before they open (the worker then
    restores them from their changelogs); True when there were some."""
    if app.conf.processing_guarantee is not ProcessingGuarantee.EXACTLY_ONCE:
        return False
    tables = Path(app.conf.tabledir)
    if not tables.exists():
        return False
    shutil.rmtree(tables)
    log.info("exactly_once_tables_discarded", path=str(tables),
             detail="restored from their changelogs: RocksDB may hold writes of an aborted transaction")
    return True


def tune_gc(gen0_threshold: int) -> None:
    """Fewer collections of Python's cyclic garbage collector, none of what exists at start.

    Every message makes a few dozen short-lived objects (Faust's message, the payload, rows,
    records), and with Python's default of a young collection every 700 allocations the collector
    took a sizeable share of the worker's time (docs/performance.md); objects made at start
    (modules, Faust's services) are frozen so the older generations' collections skip them. The
    young generation then holds at most ``gen0_threshold`` objects more before they are collected.
    """
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info("gc_tuned", gen0_threshold=gen0_threshold, frozen=gc.get_freeze_count())


class Worker(faust.Worker):
    drain_s: float = 5.0  # set from IOTFLOW_SHUTDOWN_DRAIN_S by iotflow.app
    gc_gen0_threshold: int = 50_000  # set from IOTFLOW_GC_GEN0_THRESHOLD by iotflow.app

    async def on_execute(self) -> None:
        discard_local_tables(self.app)  # before any table opens its store
        tune_gc(self.gc_gen0_threshold)
        await super().on_execute()

    def _on_sigterm(self) -> None:
        state = draining(self.app)
        if state.active:
            super()._on_sigterm()  # asked again: stop now
            return
        state.since = self.loop.time()
        log.info("worker_draining", drain_s=self.drain_s)

        async def stop_after_drain() -> None:
            await asyncio.sleep(self.drain_s)
            log.info("worker_drained", stopping=True)
            for hook in state.before_stop:
                try:
                    await asyncio.wait_for(hook(), BEFORE_STOP_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - stop anyway: what is unacknowledged is replayed
                    log.warning("before_stop_failed", hook=getattr(hook, "__qualname__", repr(hook)),
                                error=f"{exc.__class__.__name__}: {exc}")
            super(Worker, self)._on_sigterm()

        self._drain_task = asyncio.ensure_future(stop_after_drain(), loop=self.loop)
