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
SELECT s.recipe_id, k.kind, l.value ->> 0, SUM((l.value ->> 1)::bigint)
FROM shards s
CROSS JOIN (SELECT 'genre' AS kind, 'genres' AS field UNION ALL SELECT 'audience', 'audiences') k
CROSS JOIN LATERAL json_array_elements(
    CASE WHEN json_typeof(s.label_summary::json -> k.field) = 'array' THEN s.label_summary::json -> k.field
    ELSE '[]' END
) l
WHERE s.status = 'registered'
GROUP BY s.recipe_id, k.kind, l.value ->> 0;
