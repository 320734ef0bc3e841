-- vppd's store on PostgreSQL, version 1.
--
-- Records are the same serialized bytes the embedded (sled) backend keeps;
-- the columns beside them are the typed keys the store looks them up by.
-- Applied once, in order, by `vppd run` (src/store/postgres.rs), inside a
-- transaction under an advisory lock, and recorded in schema_version.

CREATE SEQUENCE job_seq;

CREATE TABLE jobs (
    id      text PRIMARY KEY,
    seq     bigint NOT NULL,
    token   text NOT NULL,
    record  bytea NOT NULL,
    spec    bytea NOT NULL
);
CREATE INDEX jobs_by_seq ON jobs (seq);

CREATE TABLE batches (
    job_id  text NOT NULL,
    no      bigint NOT NULL,
    token   text NOT NULL,
    -- Sending or Sent: the trackers read only these.
    open    boolean NOT NULL,
    record  bytea NOT NULL,
    PRIMARY KEY (job_id, no)
);
CREATE INDEX batches_open_by_token ON batches (token) WHERE open;

CREATE TABLE events (
    event_id text PRIMARY KEY,
    job_id   text NOT NULL,
    batch    bigint NOT NULL
);

CREATE TABLE failures (
    job_id  text NOT NULL,
    batch   bigint NOT NULL,
    pair    bigint NOT NULL,
    record  bytea NOT NULL,
    PRIMARY KEY (job_id, batch, pair)
);

-- notificationId -> when it was received (dedupe).
CREATE TABLE seen (
    notification_id text PRIMARY KEY,
    at_ms           bigint NOT NULL
);
CREATE INDEX seen_by_time ON seen (at_ms);

CREATE TABLE inbox (
    id       bigserial PRIMARY KEY,
    envelope bytea NOT NULL
);

CREATE TABLE outbox (
    id        bigserial PRIMARY KEY,
    job_id    text NOT NULL,
    -- commands in the entry, so a delivery reads just enough entries.
    commands  bigint NOT NULL,
    entry     bytea NOT NULL
);

CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE licenses (
    token          text NOT NULL,
    adam_id        text NOT NULL,
    pricing_param  text NOT NULL,
    record         bytea NOT NULL,
    PRIMARY KEY (token, adam_id, pricing_param)
);

CREATE TABLE users (
    token           text NOT NULL,
    client_user_id  text NOT NULL,
    record          bytea NOT NULL,
    PRIMARY KEY (token, client_user_id)
);

-- Who works what: a token, the applier, the outbox; expires unless renewed.
CREATE TABLE leases (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);
