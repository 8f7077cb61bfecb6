-- Indexes for the dashboard and `maga status` at corpus scale (tens of thousands of
-- shards a recipe): the newest page of a recipe's shards, and the newest quarantined or
-- failed ones, are read by index in `updated_at` order with a LIMIT, never by sorting
-- every shard; the counts by status are read from the second index alone.

CREATE INDEX shards_recipe_updated ON shards (recipe_id, updated_at);

CREATE INDEX shards_recipe_status_updated ON shards (recipe_id, status, updated_at);
