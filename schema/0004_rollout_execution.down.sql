-- 0004 down: drops the flags and the orchestrator's columns.
DROP TABLE feature_flags;
ALTER TABLE rollout_devices DROP COLUMN health, DROP COLUMN succeeded_at, DROP COLUMN next_attempt_at,
    DROP COLUMN notified_at, DROP COLUMN target_version;
ALTER TABLE rollouts DROP COLUMN start_at, DROP COLUMN current_wave;
