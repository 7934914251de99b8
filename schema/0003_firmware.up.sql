-- 0003 up: the firmware catalogue, rollouts and each device's execution state in a rollout.
--
-- rollout_devices is keyed (device_id, rollout_id) (seed finding R-06): a device is in a rollout
-- once, so a retried dispatch or a duplicate create can never give it a second execution.
-- rollouts.idempotency_key is unique: the same Idempotency-Key creates one rollout, however many
-- requests carry it concurrently; request_sha256 tells a repeat (same body) from a misuse.
-- The states are those of iotflow/rollouts.py (DeviceState).
-- Expand-only: nothing in 0001 or 0002 changes.

CREATE TABLE firmware (
    version      text        PRIMARY KEY CHECK (version ~ '^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$'),
    url          text        NOT NULL CHECK (url ~ '^https?://'),
    size_bytes   bigint      NOT NULL CHECK (size_bytes > 0),
    sha256       text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rollouts (
    id               uuid        PRIMARY KEY,
    firmware_version text        NOT NULL REFERENCES firmware (version),
    status           text        NOT NULL DEFAULT 'scheduled'
                                 CHECK (status IN ('scheduled', 'running', 'paused', 'completed', 'aborted', 'canceled')),
    spec             jsonb       NOT NULL,
    idempotency_key  text        NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_sha256   text        NOT NULL,
    rollback_of      uuid        REFERENCES rollouts (id),
    abort_reason     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

CREATE TABLE rollout_devices (
    device_id        text        NOT NULL REFERENCES devices (id),
    rollout_id       uuid        NOT NULL REFERENCES rollouts (id),
    wave             integer     NOT NULL CHECK (wave >= 0),
    state            text        NOT NULL DEFAULT 'QUEUED'
                                 CHECK (state IN ('QUEUED', 'NOTIFIED', 'DOWNLOADING', 'DOWNLOADED', 'VERIFIED',
                                                  'UPDATING', 'SUCCEEDED', 'FAILED', 'TIMED_OUT', 'REJECTED',
                                                  'CANCELED')),
    from_version     text,
    command_id       uuid,
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error            text,
    state_changed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, rollout_id)
);

-- The orchestrator reads a rollout's devices by wave and state.
CREATE INDEX rollout_devices_by_rollout ON rollout_devices (rollout_id, wave, state);
