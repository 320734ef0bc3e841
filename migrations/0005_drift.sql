-- A token's drift (changes made outside vppd): one record per token,
-- changed in place under a row lock by whichever process applies a change.
CREATE TABLE drift (
    token   text PRIMARY KEY,
    record  bytea NOT NULL
);
