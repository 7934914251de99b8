"""The peer a user would pick instead of iotflow, doing the same job: Quix Streams (PyPI
``quixstreams``) reading the bench's telemetry topic, dropping messages whose msg_id its RocksDB
state has seen for the device (the message key), and writing the rest to ``sensor_measurements``
in batches through the same idempotent statements as iotflow's sink (COPY into the staging table,
then the move with ON CONFLICT DO NOTHING and the stored counts), one transaction per batch.

Run by ``iotflow bench`` in its own virtualenv (``.bench-venv``, from bench/requirements-quix.txt):
it is a benchmark opponent, not a dependency of iotflow. Quix's defaults otherwise, except a commit
interval of 1 s (its default of 5 s would leave the last batch waiting up to 5 s). Its dedup state
has no expiry (Quix state has no per-key TTL): less work than iotflow's expiring marks.

Prints one JSON line: messages, seconds from the first message read to the last batch committed,
and their rate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime

import psycopg
from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch


class MeasurementSink(BatchingSink):
    def __init__(self, dsn: str, stage_sql: str, move_sql: str, copy_sql: str, target: int, done) -> None:
        super().__init__()
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute(stage_sql)
        self.move_sql, self.copy_sql = move_sql, copy_sql
        self.target, self.done = target, done
        self.messages = 0

    def write(self, batch: SinkBatch) -> None:
        with self.conn.transaction():
            with self.conn.cursor() as cur:
                with cur.copy(self.copy_sql) as copy:
                    for item in batch:
                        body = item.value
                        when = datetime.fromtimestamp(body["ts"] / 1000, UTC)
                        for name, value in body["metrics"].items():
                            copy.write_row((when, body["device_id"], name, float(value), body["msg_id"], body["seq"]))
                cur.execute(self.move_sql)
        self.messages += batch.size
        if self.messages >= self.target:
            self.done()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--messages", type=int, required=True)
    args = parser.parse_args()
    dsn, stage_sql, move_sql = os.environ["BENCH_DSN"], os.environ["BENCH_STAGE_SQL"], os.environ["BENCH_MOVE_SQL"]
    copy_sql = os.environ["BENCH_COPY_SQL"]  # into the staging table, in iotflow's sink's column order
    first_read: list[float] = []
    finished: list[float] = []

    with tempfile.TemporaryDirectory(prefix="bench-quix-") as state_dir:
        app = Application(broker_address=args.bootstrap, consumer_group=f"bench-quix-{os.getpid()}",
                          auto_offset_reset="earliest", state_dir=state_dir, commit_interval=1.0,
                          loglevel="WARNING")

        def done() -> None:
            finished.append(time.monotonic())
            app.stop()

        def first_seen(value: dict, state) -> bool:
            if not first_read:
                first_read.append(time.monotonic())
            msg_id = value["msg_id"]
            if state.get(msg_id) is not None:
                return False
            state.set(msg_id, 1)
            return True

        sink = MeasurementSink(dsn, stage_sql, move_sql, copy_sql, args.messages, done)
        sdf = app.dataframe(app.topic(args.topic, value_deserializer="json"))
        sdf.filter(first_seen, stateful=True).sink(sink)
        app.run()

    if not finished:
        sys.exit(f"stopped after {sink.messages} of {args.messages} messages")
    seconds = finished[0] - first_read[0]
    print(json.dumps({"messages": sink.messages, "seconds": round(seconds, 3), "rate": sink.messages / seconds}))


if __name__ == "__main__":
    main()
