-- The newest page of a recipe's shards in index order even when many shards share one
-- `updated_at` (planning records a whole batch at one time): the shard name breaks the
-- tie inside the index, so a LIMIT stops after the page instead of sorting the recipe.

DROP INDEX IF EXISTS shards_recipe_updated;

CREATE INDEX IF NOT EXISTS shards_recipe_updated_shard ON shards (recipe_id, updated_at, shard);

DROP INDEX IF EXISTS shards_recipe_status_updated;

CREATE INDEX IF NOT EXISTS shards_recipe_status_updated_shard ON shards (recipe_id, status, updated_at, shard);
