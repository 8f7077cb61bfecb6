-- Fencing tokens. Every lease or takeover of a shard increases `lease_token`, and the
-- lease holder's writes (progress and renewal, commit, register, quarantine, failure,
-- release) are conditional UPDATEs on the token it was given: a worker whose lease was
-- taken over holds an older token and every such write of it changes nothing.
-- `commit_token` names the lease whose staged files (`_work/{shard}/commit-{token}/`)
-- are the shard's commit: whoever holds the lease publishes exactly those bytes.

ALTER TABLE shards ADD COLUMN lease_token BIGINT NOT NULL DEFAULT 0;

ALTER TABLE shards ADD COLUMN commit_token BIGINT;
