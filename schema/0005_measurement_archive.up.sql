-- 0005 up: the cold tier's hooks in the measurements schema (iotflow/archive.py).
--
-- Days past the hot window are no longer dropped blindly: the archive job exports a day to Parquet,
-- verifies what it wrote, and only then drops the day with iotflow_drop_measurement_day(), which
-- refuses when the day holds a different number of rows than the job exported (a late row).
-- With TimescaleDB the retention policy is removed for the same reason: the job drops the chunks.
-- sensor_measurements_restored receives `iotflow archive restore` (investigation only; nothing
-- reads it but people).
--
-- Expand-only: nothing in 0001–0004 changes. A worker of the previous release still drops days
-- past the hot window unarchived in its hourly upkeep: finish replacing the workers before a day
-- falls out of the window, or stop the old ones' upkeep (docs/archive.md, upgrading).

-- The UTC days sensor_measurements holds storage for (a partition, or a chunk), oldest first.
CREATE FUNCTION iotflow_measurement_days()
RETURNS SETOF date LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'sensor_measurements'::regclass) THEN
        RETURN QUERY
            SELECT to_date(substring(c.relname from '[0-9]{8}$'), 'YYYYMMDD') AS day
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'sensor_measurements'::regclass
              AND c.relname ~ '^sensor_measurements_p[0-9]{8}$'
            ORDER BY day;
    ELSIF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        RETURN QUERY EXECUTE
            $q$SELECT DISTINCT (range_start AT TIME ZONE 'UTC')::date AS day
               FROM timescaledb_information.chunks
               WHERE hypertable_schema = current_schema() AND hypertable_name = 'sensor_measurements'
               ORDER BY day$q$;
    END IF;
END
$$;

-- Drop one UTC day of measurements if it holds exactly `expected` rows; returns whether it did.
-- The day's storage is locked against writers before the count, so no row can slip in between
-- the count and the drop.
CREATE FUNCTION iotflow_drop_measurement_day(day date, expected bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    first timestamptz := day::timestamp AT TIME ZONE 'UTC';
    last timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
    part text := format('sensor_measurements_p%s', to_char(day, 'YYYYMMDD'));
    chunk record;
    found bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('iotflow_measurement_partitions'));
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'sensor_measurements'::regclass) THEN
        IF to_regclass(part) IS NULL THEN
            RETURN expected = 0;
        END IF;
        EXECUTE format('LOCK TABLE %I IN SHARE MODE', part);
        EXECUTE format('SELECT count(*) FROM %I', part) INTO found;
        IF found <> expected THEN
            RETURN false;
        END IF;
        EXECUTE format('DROP TABLE %I', part);
        RETURN true;
    END IF;
    FOR chunk IN EXECUTE
        $q$SELECT format('%I.%I', chunk_schema, chunk_name) AS name FROM timescaledb_information.chunks
           WHERE hypertable_schema = current_schema() AND hypertable_name = 'sensor_measurements'
             AND range_start >= $1 AND range_end <= $2$q$ USING first, last
    LOOP
        EXECUTE format('LOCK TABLE %s IN SHARE MODE', chunk.name);
    END LOOP;
    SELECT count(*) INTO found FROM sensor_measurements WHERE time >= first AND time < last;
    IF found <> expected THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT count(*) FROM drop_chunks(''sensor_measurements'', older_than => $1, newer_than => $2)'
        USING last, first;
    RETURN true;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM remove_retention_policy('sensor_measurements', if_exists => true);
    END IF;
END
$$;

-- The columns of sensor_measurements (received_at as archived), its key, and when it was restored.
CREATE TABLE sensor_measurements_restored (
    LIKE sensor_measurements INCLUDING DEFAULTS,
    restored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, time, metric, msg_id)
);
