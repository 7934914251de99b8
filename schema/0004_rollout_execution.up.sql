-- 0004 up: what the rollout orchestrator needs to execute rollouts, and feature flags.
--
-- rollouts.current_wave: the highest wave the orchestrator has opened (devices of waves up to it
-- may be dispatched). rollout_devices gains the version each device is sent (a rollback sends
-- every device the version it came from), when it was notified (the in-progress timeout counts
-- from there), when its next attempt may start (retries back off), and its health after
-- SUCCEEDED: NULL while the observation window runs, 'ok' once it heartbeated after success,
-- 'failed' when it went silent or reported an error — counted as a failure by the abort criteria.
-- A device's command_id is written *before* the command is published: a leader that dies between
-- the two leaves it for the next leader to publish again with the same id, which devices dedupe.
--
-- feature_flags: the global kill switch of rollout dispatch and other flags; `percentage` targets
-- a share of subjects (devices) by a stable hash.
-- Expand-only: nothing in 0001–0003 changes (new columns are nullable or have defaults).

ALTER TABLE rollouts ADD COLUMN current_wave integer NOT NULL DEFAULT 0 CHECK (current_wave >= 0);
ALTER TABLE rollouts ADD COLUMN start_at timestamptz;

ALTER TABLE rollout_devices ADD COLUMN target_version text REFERENCES firmware (version);
ALTER TABLE rollout_devices ADD COLUMN notified_at timestamptz;
ALTER TABLE rollout_devices ADD COLUMN next_attempt_at timestamptz;
ALTER TABLE rollout_devices ADD COLUMN succeeded_at timestamptz;
ALTER TABLE rollout_devices ADD COLUMN health text CHECK (health IN ('ok', 'failed'));

CREATE TABLE feature_flags (
    name        text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_.:-]{0,127}$'),
    enabled     boolean     NOT NULL,
    percentage  integer     NOT NULL DEFAULT 100 CHECK (percentage BETWEEN 0 AND 100),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
