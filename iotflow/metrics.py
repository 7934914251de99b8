"""Prometheus metrics of iotflow (served at /metrics). No per-device labels: cardinality stays bounded."""
from __future__ import annotations

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
DLQ = Counter("iotflow_dlq_messages_total", "Messages sent to sensor-data-dlq, by kind (invalid, rejected, unknown_device, deleted_device).", ["kind"])
DEDUP_EXPIRED = Counter("iotflow_dedup_marks_expired_total", "Dedup marks deleted after the dedup window.")
DEDUP_MARKS = Gauge("iotflow_dedup_marks", "Dedup marks held by this worker's active partitions (counted at scrape).")
SINK_BATCH_SECONDS = Histogram(
    "iotflow_sink_batch_seconds",
    "Time to make one batch durable (DLQ confirmations + COPY + commit), retries included.",
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
