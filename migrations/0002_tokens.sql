-- vppd's store on PostgreSQL, version 2: tokens added, renewed and removed
-- through the token API while vppd runs.
--
-- `stoken` is the customer's secret as downloaded from Apple School/Business
-- Manager: grant this database to vppd's role alone.

CREATE TABLE tokens (
    name        text PRIMARY KEY,
    stoken      text NOT NULL,
    takeover    boolean NOT NULL,
    updated_ms  bigint NOT NULL
);

-- Each token's state (its token document, JSON) as the replica working it
-- last stored it, for the others to show. Config-file tokens have one too.
CREATE TABLE token_states (
    name   text PRIMARY KEY,
    state  text NOT NULL
);
