-- Fill `registered_tallies` from the shards registered before it existed (SQLite's
-- JSON functions; the PostgreSQL file does the same with its own).

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, 'reason', r.key, SUM(r.value)
FROM shards s, json_each(s.rejects_by_reason) r
WHERE s.status = 'registered' AND json_valid(s.rejects_by_reason) AND json_type(s.rejects_by_reason) = 'object'
GROUP BY s.recipe_id, r.key;

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, k.kind, json_extract(l.value, '$[0]'), SUM(json_extract(l.value, '$[1]'))
FROM shards s
CROSS JOIN (SELECT 'genre' AS kind, '$.genres' AS path UNION ALL SELECT 'audience', '$.audiences') k
CROSS JOIN json_each(s.label_summary, k.path) l
WHERE s.status = 'registered' AND json_valid(s.label_summary) AND json_type(s.label_summary, k.path) = 'array'
GROUP BY s.recipe_id, k.kind, json_extract(l.value, '$[0]');
