-- Data-quality gate results: one row per validation run of a shard and suite, kept as
-- history (a forced re-validation adds a row, it never rewrites an old one).

CREATE TABLE quality_results (
    result_id           TEXT PRIMARY KEY,   -- random hex, made by the writer
    recipe_id           TEXT NOT NULL,
    shard               TEXT NOT NULL,
    suite               TEXT NOT NULL,      -- 'input' or 'output'
    success             INTEGER NOT NULL CHECK (success IN (0, 1)),
    evaluated           INTEGER NOT NULL DEFAULT 0,
    failed              INTEGER NOT NULL DEFAULT 0,
    statistics          TEXT,               -- JSON: GX statistics + shard figures
    failed_expectations TEXT,               -- JSON list: check, expectation, column, observed
    docs_uri            TEXT,               -- Data Docs index of this run
    created_at          TEXT NOT NULL
);

CREATE INDEX quality_results_shard ON quality_results (recipe_id, shard, created_at);
