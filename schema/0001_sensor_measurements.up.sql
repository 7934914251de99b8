-- 0001 up: the time-series table of sensor measurements.
--
-- One row per (message, metric). The primary key is the measurement key: a replayed or duplicated
-- message hits it and is dropped by the sink's INSERT … ON CONFLICT DO NOTHING (invariant 2).
-- It leads with (device_id, time) so per-device range queries use it, and includes `time` because
-- both TimescaleDB and native partitioning require the partition column in every unique index.
--
-- With the TimescaleDB extension: a hypertable with 1-day chunks, compression after 7 days
-- (segmented by device) and a 90-day retention policy (the hot-data window).
-- Without it: native range partitioning by UTC day; iotflow_ensure_measurement_partitions()
-- creates days ahead, iotflow_drop_measurement_partitions() applies the retention.

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    END IF;
END
$$;

DO $$
DECLARE
    timescale boolean := EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb');
BEGIN
    EXECUTE format($ddl$
        CREATE TABLE sensor_measurements (
            time        timestamptz      NOT NULL,
            device_id   text             NOT NULL,
            metric      text             NOT NULL,
            value       double precision NOT NULL,
            msg_id      text             NOT NULL,
            seq         bigint           NOT NULL,
            received_at timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY (device_id, time, metric, msg_id)
        ) %s
    $ddl$, CASE WHEN timescale THEN '' ELSE 'PARTITION BY RANGE (time)' END);
    IF timescale THEN
        PERFORM create_hypertable('sensor_measurements', 'time', chunk_time_interval => interval '1 day');
        ALTER TABLE sensor_measurements SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'device_id',
            timescaledb.compress_orderby = 'time DESC, metric, msg_id'
        );
        PERFORM add_compression_policy('sensor_measurements', interval '7 days');
        PERFORM add_retention_policy('sensor_measurements', interval '90 days');
    END IF;
END
$$;

-- Partition upkeep for plain PostgreSQL; both return 0 on a hypertable (TimescaleDB's policies do it).
CREATE FUNCTION iotflow_ensure_measurement_partitions(days_back integer, days_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    day date;
    made integer := 0;
    name text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'sensor_measurements'::regclass) THEN
        RETURN 0;
    END IF;
    -- Workers call this concurrently; CREATE … PARTITION OF is not safe to race.
    PERFORM pg_advisory_xact_lock(hashtext('iotflow_measurement_partitions'));
    FOR day IN SELECT generate_series((now() AT TIME ZONE 'UTC')::date - days_back,
                                      (now() AT TIME ZONE 'UTC')::date + days_ahead,
                                      interval '1 day')::date
    LOOP
        name := format('sensor_measurements_p%s', to_char(day, 'YYYYMMDD'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF sensor_measurements FOR VALUES FROM (%L) TO (%L)',
                name, (day::timestamp AT TIME ZONE 'UTC'), ((day + 1)::timestamp AT TIME ZONE 'UTC'));
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END
$$;

CREATE FUNCTION iotflow_drop_measurement_partitions(retention interval)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'sensor_measurements'::regclass) THEN
        RETURN 0;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('iotflow_measurement_partitions'));
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'sensor_measurements'::regclass
          AND c.relname ~ '^sensor_measurements_p[0-9]{8}$'
          AND (to_date(substring(c.relname from '[0-9]{8}$'), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
              <= now() - retention
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;

SELECT iotflow_ensure_measurement_partitions(91, 7);
