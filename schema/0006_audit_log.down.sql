-- 0006 down: the audit log goes, with its rows (take a copy first if they matter).
DROP TABLE audit_log;
DROP FUNCTION iotflow_audit_log_is_append_only();
