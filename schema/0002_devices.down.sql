-- 0002 down: removes the device registry and its outbox (the measurements of 0001 stay).
DROP TABLE IF EXISTS device_outbox;
DROP TABLE IF EXISTS devices;
