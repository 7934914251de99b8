"""Prometheus metrics of iotflow (served at /metrics). No per-device labels: cardinality stays bounded."""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "iotflow_ingest_messages_total",
    "Messages the ingest agent decided on, by outcome (new, duplicate, invalid, rejected, replay); "
    "parked counts a message put to wait for its device's registration (counted again when settled).",
    ["outcome"],
)
# The outcome children, resolved once: ``labels()`` per message showed up in profiles.
MESSAGES_BY_OUTCOME = {outcome: MESSAGES.labels(outcome)
                       for outcome in ("new", "duplicate", "invalid", "rejected", "replay", "parked")}
PARKED = Gauge("iotflow_ingest_parked_messages",
               "Messages of devices the registry does not know yet, waiting for their registration (counted at scrape).")
ROWS_STORED = Counter("iotflow_sink_rows_stored_total", "Measurement rows the sink inserted (new rows only).")
DLQ = Counter("iotflow_dlq_messages_total", "Messages sent to sensor-data-dlq, by kind (invalid, rejected, unknown_device, deleted_device, identity_mismatch).", ["kind"])
DEDUP_EXPIRED = Counter("iotflow_dedup_marks_expired_total", "Dedup marks deleted after the dedup window.")
DEDUP_MARKS = Gauge("iotflow_dedup_marks", "Dedup marks held by this worker's active partitions (its expiry index: rebuilt at the first message after an assignment).")
SINK_BATCH_SECONDS = Histogram(
    "iotflow_sink_batch_seconds",
    "Time to store one batch's rows (COPY, move, commit), retries included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OUTBOX_PUBLISHED = Counter("iotflow_outbox_published_total", "Device events the outbox relay published to device-events.")
DEVICE_EVENTS = Counter(
    "iotflow_device_events_total",
    "Records the devices agent read from device-events, by outcome (applied; duplicate: applied before, by seq; heartbeat; unreadable).",
    ["outcome"],
)
CACHE = Counter(
    "iotflow_cache_requests_total",
    "Device cache requests by result (hit, miss, error: Redis failed or timed out, skipped: breaker open).",
    ["result"],
)
CIRCUIT_OPEN = Gauge("iotflow_circuit_open", "1 while a dependency's circuit breaker is open or half-open.", ["dependency"])
LAST_SEEN_SAVED = Counter("iotflow_last_seen_saved_total", "Devices whose last_seen moved forward in PostgreSQL.")
SINK_BATCH_ROWS = Histogram(
    "iotflow_sink_batch_rows", "Rows per batch the sink wrote.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
SINK_ERRORS = Counter(
    "iotflow_sink_errors_total",
    "Failed sink writes by kind (retriable: retried with backoff; schema: a migration is missing, retried until it is applied; "
    "rejected: the batch was refused and split).",
    ["kind"],
)
E2E_LATENCY = Histogram(
    "iotflow_ingest_e2e_latency_seconds",
    "From the device's ts to its batch acknowledged (rows committed, batches in order), per stored message.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CONSUMER_LAG = Gauge(
    "iotflow_consumer_lag_records",
    "Records in a partition this worker owns after its last committed offset (updated every few seconds).",
    ["topic", "partition"],
)
PROCESSING_LAG = Gauge(
    "iotflow_ingest_lag_seconds",
    "Per sensor-data partition with records behind: seconds since the newest message made durable was "
    "produced (0 when caught up). Grows while the worker is stuck.",
    ["partition"],
)
TABLE_RECOVERY_ACTIVE = Gauge("iotflow_table_recovery_in_progress", "1 while this worker restores tables from changelogs.")
TABLE_RECOVERY_REMAINING = Gauge(
    "iotflow_table_recovery_remaining_records", "Changelog records left to restore before this worker's tables are active.")
TABLE_STANDBY_REMAINING = Gauge(
    "iotflow_table_standby_remaining_records",
    "Changelog records this worker's standby replicas have yet to read, up to the changelogs' ends at its last rebalance.")
POOL_CONNECTIONS = Gauge(
    "iotflow_pg_pool_connections", "PostgreSQL pool connections by pool and state (in_use, idle, max).", ["pool", "state"])
HTTP_REQUESTS = Counter(
    "iotflow_http_requests_total", "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "code"])
HTTP_DURATION = Histogram(
    "iotflow_http_request_duration_seconds", "Time to answer an HTTP request, by route template and method.",
    ["route", "method"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ACCOUNTING = Gauge(
    "iotflow_accounting_messages",
    "This worker's per-device accounts added up (received, accepted, duplicates, invalid, rejected, gaps); "
    "sampled every minute. Fleet loss ratio = sum(gaps) / (sum(accepted) + sum(gaps)).",
    ["kind"],
)
COMMANDS_PUBLISHED = Counter("iotflow_firmware_commands_published_total",
                             "Firmware commands the MQTT broker acknowledged (a re-publish with the same command id counts again).")
FIRMWARE_PROGRESS = Gauge(
    "iotflow_firmware_update_progress",
    "Devices of a rollout per execution state (SUCCEEDED_UNHEALTHY: succeeded, then failed the health gate); "
    "set by the leader's orchestrator for rollouts that are active or ended within the hour.",
    ["rollout_id", "status"])
FIRMWARE_UPDATE_SECONDS = Histogram(
    "iotflow_firmware_update_duration_seconds", "Time from a device's command (NOTIFIED) to its SUCCEEDED report.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200))
FIRMWARE_REPORTS = Counter(
    "iotflow_firmware_reports_total",
    "Device status reports read from firmware-status, by outcome (applied; duplicate: changed nothing; stale: for "
    "an older command; unknown: no such execution; invalid: sent to the DLQ).", ["outcome"])
FIRMWARE_FAILURES = Counter(
    "iotflow_firmware_update_failures_total",
    "Device executions that ended badly, by state (FAILED, TIMED_OUT, REJECTED, UNHEALTHY).", ["state"])
ROLLOUTS_ENDED = Counter("iotflow_rollouts_ended_total", "Rollouts that ended, by status (completed, aborted, canceled).",
                         ["status"])
FETCH_HELD = Gauge(
    "iotflow_consumer_partitions_not_fetched",
    "Assigned partitions of the source topics the fetcher does not read now (paused, or their stream's buffer "
    "under pressure); outside table recovery this should return to 0 within seconds (else a "
    "partitions_not_fetched warning names them and why).")
ARCHIVE_LAG = Gauge(
    "iotflow_archive_lag_seconds",
    "How long the oldest day past the hot window has waited to be archived and dropped (0: none waiting); "
    "set by each run of the archive job.")
ARCHIVE_DAYS = Counter(
    "iotflow_archive_days_total",
    "Days the archive job finished, by outcome (archived: exported, verified and dropped; empty: dropped with "
    "nothing to export; expired: deleted from the archive past its keep time).", ["outcome"])
ARCHIVE_ROWS = Counter("iotflow_archive_rows_total", "Measurement rows the archive job exported and verified.")
ARCHIVE_BYTES = Counter("iotflow_archive_bytes_written_total", "Parquet bytes the archive job wrote to the object store.")
ARCHIVE_FAILURES = Counter(
    "iotflow_archive_failures_total",
    "Archive job runs that stopped on an error, by stage (connect, export, upload, verify, drop, expire, unexpected).", ["stage"])
TIMER_FAILURES = Counter(
    "iotflow_timer_failures_total",
    "Rounds of a background timer (outbox relay, orchestrator, metrics samples, upkeep) that raised an unexpected "
    "error; logged with its traceback as timer_failed, and the next round runs.", ["timer"])
ARCHIVE_LAST_SUCCESS = Gauge(
    "iotflow_archive_last_success_timestamp_seconds", "When the archive job last finished a run without an error.")


def observe_all(histogram: Histogram, amounts: Iterable[float]) -> None:
    """``histogram.observe`` of every amount, with one increment per bucket and one of the sum
    instead of two per amount (the ingest agent observes a latency per stored message; each
    ``observe`` takes two locks). prometheus_client's own bookkeeping: an amount goes to the first
    bucket whose upper bound is not below it (``_upper_bounds`` ends with +Inf)."""
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for amount in amounts:
        counts[bisect_left(bounds, amount)] += 1
        total += amount
    for bucket, count in zip(histogram._buckets, counts):
        if count:
            bucket.inc(count)
    histogram._sum.inc(total)
