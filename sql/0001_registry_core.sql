-- Registry core: recipes (one per corpus version) and the lifecycle of every shard.
--
-- Portable across SQLite and PostgreSQL: TEXT keys, BIGINT counters, DOUBLE PRECISION
-- measurements, timestamps as TEXT in fixed-width ISO-8601 UTC
-- ('2026-11-01T02:00:00.000000Z') so that string order is time order, JSON as TEXT.
-- Statements are separated by ';' at the end of a line; no ';' inside literals.

CREATE TABLE schema_version (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    checksum    TEXT NOT NULL,   -- sha256 of the migration file as applied
    applied_at  TEXT NOT NULL
);

CREATE TABLE recipes (
    recipe_id           TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    prompt_version      TEXT NOT NULL,
    model               TEXT NOT NULL,
    pairs_per_document  INTEGER NOT NULL,
    recipe_yaml         TEXT NOT NULL,
    created_at          TEXT NOT NULL
);

-- One row per (recipe, shard). Counters describe the committed output files; until a
-- shard is committed they hold the last progress report of the worker expanding it.
-- No foreign key to recipes: planning may record shards before a worker has stored the
-- recipe itself, and a registry row must never be lost to a missing parent.
CREATE TABLE shards (
    recipe_id           TEXT NOT NULL,
    shard               TEXT NOT NULL,
    source_uri          TEXT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'planned'
        CHECK (status IN ('planned', 'leased', 'expanding', 'committed', 'validated',
                          'registered', 'quarantined', 'failed')),
    data_uri            TEXT,
    rejected_uri        TEXT,
    docs_uri            TEXT,
    documents           BIGINT NOT NULL DEFAULT 0,
    accepted            BIGINT NOT NULL DEFAULT 0,
    rejected            BIGINT NOT NULL DEFAULT 0,
    requests            BIGINT NOT NULL DEFAULT 0,
    prompt_tokens       BIGINT NOT NULL DEFAULT 0,
    completion_tokens   BIGINT NOT NULL DEFAULT 0,
    source_chars        BIGINT NOT NULL DEFAULT 0,
    output_chars        BIGINT NOT NULL DEFAULT 0,
    expansion_ratio     DOUBLE PRECISION,
    rejects_by_reason   TEXT,            -- JSON object reason -> rows
    checksum            TEXT,            -- sha256 of data + rejected file bytes
    attempts            INTEGER NOT NULL DEFAULT 0,
    lease_owner         TEXT,
    lease_expires_at    TEXT,
    started_at          TEXT,
    finished_at         TEXT,
    seconds             DOUBLE PRECISION,
    last_error          TEXT,
    failed_expectations TEXT,            -- JSON list, set when quarantined
    label_summary       TEXT,            -- JSON: top genres/audiences of the accepted rows
    progress            TEXT,            -- JSON: the worker's last progress report
    registered_at       TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    PRIMARY KEY (recipe_id, shard)
);

CREATE INDEX shards_status ON shards (status, recipe_id);
