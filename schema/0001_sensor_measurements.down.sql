-- 0001 down: removes the measurements table (and every partition or chunk of it) and its upkeep.
DROP FUNCTION IF EXISTS iotflow_drop_measurement_partitions(interval);
DROP FUNCTION IF EXISTS iotflow_ensure_measurement_partitions(integer, integer);
DROP TABLE IF EXISTS sensor_measurements CASCADE;
