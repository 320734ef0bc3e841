-- vppd's store on PostgreSQL, version 2: parked notifications and the
-- store's generation.

-- Notifications for an eventId not (yet) in `events`, out of the inbox so
-- the applier never rereads them. `id` is the inbox id they had: recording
-- the event moves them back under it, in their arrival order.
CREATE TABLE parked (
    id        bigint PRIMARY KEY,
    event_id  text NOT NULL,
    at_ms     bigint NOT NULL,
    envelope  bytea NOT NULL
);
CREATE INDEX parked_by_event ON parked (event_id);
CREATE INDEX parked_by_time ON parked (at_ms, id);

-- Advanced whenever the watermark is read: a value that never goes down
-- while the database is intact (src/store/marker.rs).
CREATE SEQUENCE store_generation;
