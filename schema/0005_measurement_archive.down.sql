-- 0005 down: blind retention again (TimescaleDB's policy; plain PostgreSQL's upkeep drops days).
DROP TABLE sensor_measurements_restored;
DROP FUNCTION iotflow_drop_measurement_day(date, bigint);
DROP FUNCTION iotflow_measurement_days();
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM add_retention_policy('sensor_measurements', interval '90 days', if_not_exists => true);
    END IF;
END
$$;
