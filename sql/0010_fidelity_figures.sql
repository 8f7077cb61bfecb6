-- The fidelity counts of each shard (`data.figures`): rewrites whose invented facts were
-- counted and those with at least one, rewrites the label-echo check judged and those it
-- rejected, accepted rows whose genre has a form cue and those showing it. The rates
-- (invented_fact_rate, label_echo_rate, genre_kept_rate) are read as ratios of these, so
-- a recipe's rate is weighted by rows. NULL on a shard registered before they were
-- recorded: its rates read as null, and the running totals count only measured shards.

ALTER TABLE shards ADD COLUMN fact_checked_rows BIGINT;

ALTER TABLE shards ADD COLUMN invented_fact_rows BIGINT;

ALTER TABLE shards ADD COLUMN echo_checked_rows BIGINT;

ALTER TABLE shards ADD COLUMN label_echo_rows BIGINT;

ALTER TABLE shards ADD COLUMN genre_cue_rows BIGINT;

ALTER TABLE shards ADD COLUMN genre_kept_rows BIGINT;

ALTER TABLE registered_totals ADD COLUMN fact_checked_rows BIGINT NOT NULL DEFAULT 0;

ALTER TABLE registered_totals ADD COLUMN invented_fact_rows BIGINT NOT NULL DEFAULT 0;

ALTER TABLE registered_totals ADD COLUMN echo_checked_rows BIGINT NOT NULL DEFAULT 0;

ALTER TABLE registered_totals ADD COLUMN label_echo_rows BIGINT NOT NULL DEFAULT 0;

ALTER TABLE registered_totals ADD COLUMN genre_cue_rows BIGINT NOT NULL DEFAULT 0;

ALTER TABLE registered_totals ADD COLUMN genre_kept_rows BIGINT NOT NULL DEFAULT 0;
