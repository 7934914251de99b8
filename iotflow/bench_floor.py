"""The floor of ``iotflow bench``: a Faust agent that does nothing with each event but acknowledge it.

Run as ``faust -A iotflow.bench_floor worker`` with the same ``IOTFLOW_*`` settings (and
therefore the same transport) as the iotflow worker; ``GET /bench/floor`` answers how many events
it has seen. Its rate is what Faust's per-event path costs before iotflow does any work, measured
in the same run as the rest of the benchmark.
"""
from __future__ import annotations

import faust
from faust.web import Request, Response, View

from iotflow import topics
from iotflow.settings import Settings
from iotflow.transport import Transport
from iotflow.web import health

settings = Settings.from_env()
app = faust.App(
    settings.app_id,
    broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
    store="memory://",
    autodiscover=False,
    web_host=settings.web_host,
    web_port=settings.web_port,
    topic_partitions=settings.topic_partitions,
    consumer_auto_offset_reset="earliest",
    stream_wait_empty=False,
)
app.transport = Transport(app.conf.broker_consumer, app)
seen = 0


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
