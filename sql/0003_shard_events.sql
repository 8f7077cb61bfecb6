-- Audit trail of shard transitions (lease, takeover, release, register, quarantine,
-- failure): who did what when, kept after the shard row itself has moved on.

CREATE TABLE shard_events (
    event_id    TEXT PRIMARY KEY,   -- random hex, made by the writer
    recipe_id   TEXT NOT NULL,
    shard       TEXT NOT NULL,
    event       TEXT NOT NULL,
    owner       TEXT,
    detail      TEXT,               -- JSON
    created_at  TEXT NOT NULL
);

CREATE INDEX shard_events_shard ON shard_events (recipe_id, shard, created_at);
