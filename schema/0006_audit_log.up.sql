-- 0006 up: the audit log of management actions (iotflow/audit.py).
--
-- One row per mutating API call that changed something (and per CLI provisioning run), written in
-- the same transaction as the change: the row exists if and only if the change does. Append-only:
-- UPDATE, DELETE and TRUNCATE are refused by triggers, for every role that is not a superuser
-- acting on the triggers themselves.
--
-- Expand-only: nothing in 0001–0005 changes.

CREATE TABLE audit_log (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,          -- the token's subject, or system:<user> for the CLI
    role        text        NOT NULL,          -- viewer | operator | admin | system
    action      text        NOT NULL,          -- device.register, rollout.pause, flag.set, ...
    target_type text        NOT NULL,
    target_id   text        NOT NULL,
    request_id  text,                          -- the X-Request-ID of the call
    details     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_actor ON audit_log (actor, id);
CREATE INDEX audit_log_target ON audit_log (target_type, target_id, id);

CREATE FUNCTION iotflow_audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION iotflow_audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION iotflow_audit_log_is_append_only();
