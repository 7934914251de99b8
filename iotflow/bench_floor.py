"""The floors of ``iotflow bench``: a Faust worker that does nothing with each record but acknowledge it.

Run as ``faust -A iotflow.bench_floor worker`` with the same ``IOTFLOW_*`` settings (and
therefore the same transport) as the iotflow worker; ``GET /bench/floor`` answers how many records
it has seen. With ``BENCH_FLOOR=agent`` (the default) the records go through a Faust agent's
stream, an ``Event`` each: what Faust's per-event path costs before any work. With ``batch`` they go
the way iotflow's ingest takes them (:func:`iotflow.transport.consume_in_batches`: a fetch at a
time to a handler that tracks and acknowledges each record).
"""
from __future__ import annotations

import os

import faust
from faust.types import Message
from faust.web import Request, Response, View

from iotflow import topics
from iotflow.settings import Settings
from iotflow.transport import Transport, consume_in_batches
from iotflow.web import health

settings = Settings.from_env()
app = faust.App(
    settings.app_id,
    broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
    store="memory://",
    datadir=str(settings.worker_dir),  # the bench's state folder, not an empty <app id>-data in the working folder
    autodiscover=False,
    web_host=settings.web_host,
    web_port=settings.web_port,
    topic_partitions=settings.topic_partitions,
    consumer_auto_offset_reset="earliest",
    stream_wait_empty=False,
)
app.transport = Transport(app.conf.broker_consumer, app)
seen = 0


if os.environ.get("BENCH_FLOOR", "agent") == "batch":
    async def take(messages: list[Message]) -> None:
        global seen
        consumer = app.consumer
        for message in messages:
            consumer.track_message(message)
            message.ack(consumer)
        seen += len(messages)

    consume_in_batches(app, topics.sensor_data(app, settings), take)
else:
    @app.agent(topics.sensor_data(app, settings), name="iotflow.bench.floor")
    async def floor(stream: faust.StreamT) -> None:
        global seen
        async for event in stream.noack().events():
            seen += 1
            event.ack()


@app.page("/bench/floor")
async def count(self: View, request: Request) -> Response:
    return self.json({"seen": seen})


health.register(app)
