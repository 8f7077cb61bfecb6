-- Running totals of each recipe's registered shards, so that the dashboard and
-- `maga status` read a few rows whatever the number of shards. `register` adds a
-- shard's figures in the transaction that registers it; registered is a final status
-- (nothing moves a shard out of it), so the totals only grow.

CREATE TABLE registered_totals (
    recipe_id           TEXT PRIMARY KEY,
    shards              BIGINT NOT NULL DEFAULT 0,
    documents           BIGINT NOT NULL DEFAULT 0,
    accepted            BIGINT NOT NULL DEFAULT 0,
    rejected            BIGINT NOT NULL DEFAULT 0,
    requests            BIGINT NOT NULL DEFAULT 0,
    prompt_tokens       BIGINT NOT NULL DEFAULT 0,
    completion_tokens   BIGINT NOT NULL DEFAULT 0,
    source_chars        BIGINT NOT NULL DEFAULT 0,
    output_chars        BIGINT NOT NULL DEFAULT 0,
    seconds             DOUBLE PRECISION NOT NULL DEFAULT 0
);

-- Rejected rows by reason, and accepted rows by genre and audience label (of each
-- shard's top labels), summed over a recipe's registered shards.
CREATE TABLE registered_tallies (
    recipe_id   TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('reason', 'genre', 'audience')),
    label       TEXT NOT NULL,
    total       BIGINT NOT NULL,
    PRIMARY KEY (recipe_id, kind, label)
);

-- The top labels of a recipe by index, however many distinct labels its model wrote.
CREATE INDEX registered_tallies_top ON registered_tallies (recipe_id, kind, total);

INSERT INTO registered_totals (recipe_id, shards, documents, accepted, rejected, requests, prompt_tokens,
                               completion_tokens, source_chars, output_chars, seconds)
SELECT recipe_id, COUNT(*), SUM(documents), SUM(accepted), SUM(rejected), SUM(requests), SUM(prompt_tokens),
       SUM(completion_tokens), SUM(source_chars), SUM(output_chars), COALESCE(SUM(seconds), 0)
FROM shards WHERE status = 'registered' GROUP BY recipe_id;
