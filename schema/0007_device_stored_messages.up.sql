-- 0007 up: messages stored per device, kept by the sink in the transaction that stores them.
--
-- The accounting endpoint's `stored` figure was count(DISTINCT device_id, msg_id) over the
-- device's rows: its cost grew with the hot window (a 10M-message soak saw it miss a 10 s timeout).
-- The sink now adds, per batch, the messages whose rows it inserted (INSERT … ON CONFLICT DO NOTHING
-- RETURNING), so a replayed batch adds nothing; reading a device's figure is one primary-key row.
-- The figure counts what was ever stored: days archived or dropped by retention are not taken off.
--
-- Expand-only: nothing in 0001–0006 changes. The rows already stored are counted here; rows a
-- worker of the previous release stores after this ran are not counted (finish replacing the
-- workers right after migrating, as for every release).

CREATE TABLE device_stored_messages (
    device_id text   PRIMARY KEY,
    messages  bigint NOT NULL CHECK (messages >= 0)
);

INSERT INTO device_stored_messages (device_id, messages)
SELECT device_id, count(DISTINCT msg_id) FROM sensor_measurements GROUP BY device_id;
