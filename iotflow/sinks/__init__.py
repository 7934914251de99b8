"""Database sinks of iotflow, each behind the same small add/flush contract (ingestion issue)."""
