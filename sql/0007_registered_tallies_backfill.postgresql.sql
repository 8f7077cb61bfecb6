-- Fill `registered_tallies` from the shards registered before it existed (PostgreSQL's
-- JSON functions; the SQLite file does the same with its own). JSON columns are TEXT;
-- a shard without reasons or labels unnests to nothing.

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, 'reason', r.key, SUM(r.value::bigint)
FROM shards s, json_each_text(
    CASE WHEN json_typeof(s.rejects_by_reason::json) = 'object' THEN s.rejects_by_reason::json ELSE '{}' END
) r
WHERE s.status = 'registered'
GROUP BY s.recipe_id, r.key;

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, 'genre', g.value ->> 0, SUM((g.value ->> 1)::bigint)
FROM shards s, json_array_elements(
    CASE WHEN json_typeof(s.label_summary::json -> 'genres') = 'array' THEN s.label_summary::json -> 'genres'
    ELSE '[]' END
) g
WHERE s.status = 'registered'
GROUP BY s.recipe_id, g.value ->> 0;

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, 'audience', a.value ->> 0, SUM((a.value ->> 1)::bigint)
FROM shards s, json_array_elements(
    CASE WHEN json_typeof(s.label_summary::json -> 'audiences') = 'array' THEN s.label_summary::json -> 'audiences'
    ELSE '[]' END
) a
WHERE s.status = 'registered'
GROUP BY s.recipe_id, a.value ->> 0;
