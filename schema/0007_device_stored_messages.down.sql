-- 0007 down: the per-device stored counts go (the releases before read count(DISTINCT …) instead).
DROP TABLE device_stored_messages;
