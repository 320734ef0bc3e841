-- vppd's store on PostgreSQL, version 2: user assignment.
--
-- Installs for user targets wait here until their user is `Associated`;
-- then they move to the outbox in one transaction (or are dropped when the
-- user is retired). `entry` is the same serialized outbox entry.

CREATE TABLE held (
    id      bigserial PRIMARY KEY,
    token   text NOT NULL,
    job_id  text NOT NULL,
    entry   bytea NOT NULL
);
CREATE INDEX held_by_token ON held (token, id);
