-- vppd's store on PostgreSQL, version 6: a token's jobs by index.

-- Each token's submitter, drift follower and users step read their own
-- token's jobs (`Store::jobs_of`) whenever they wake: without an index,
-- every such read scanned the whole table, once per token.
CREATE INDEX jobs_by_token ON jobs (token, seq);
