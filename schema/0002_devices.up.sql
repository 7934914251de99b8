-- 0002 up: the device registry and its transactional outbox.
--
-- A device is never removed: DELETE through the API sets deleted_at (soft delete) so its history
-- (measurements, rollouts, lifecycle events) keeps its meaning (seed finding R-05). `version`
-- is the optimistic-concurrency token: every update increments it, and PATCH with a stale
-- If-Match is refused (412).
--
-- Every change of a device writes one device_outbox row in the same transaction; the relay
-- publishes unpublished rows to the device-events topic in `seq` order and marks them published.
-- event_id is the consumers' dedup key (at most once per event id as they see it).
-- Expand-only: nothing in 0001 changes.

CREATE TABLE devices (
    id               text        PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    name             text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    type             text        NOT NULL CHECK (type ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    tags             text[]      NOT NULL DEFAULT '{}',
    firmware_version text        CHECK (length(firmware_version) BETWEEN 1 AND 64),
    status           text        NOT NULL DEFAULT 'active'
                                 CHECK (status IN ('provisioned', 'active', 'inactive', 'maintenance')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz,
    version          integer     NOT NULL DEFAULT 1 CHECK (version >= 1),
    deleted_at       timestamptz
);

-- The list filters: type, status and firmware among live devices; tags by containment.
CREATE INDEX devices_live_type ON devices (type, id) WHERE deleted_at IS NULL;
CREATE INDEX devices_live_status ON devices (status, id) WHERE deleted_at IS NULL;
CREATE INDEX devices_live_firmware ON devices (firmware_version, id) WHERE deleted_at IS NULL;
CREATE INDEX devices_tags ON devices USING gin (tags);

CREATE TABLE device_outbox (
    seq          bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    device_id    text        NOT NULL REFERENCES devices (id),
    kind         text        NOT NULL CHECK (kind IN ('registered', 'updated', 'deleted')),
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE INDEX device_outbox_unpublished ON device_outbox (seq) WHERE published_at IS NULL;
