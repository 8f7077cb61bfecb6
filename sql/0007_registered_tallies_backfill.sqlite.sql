-- Fill `registered_tallies` from the shards registered before it existed (SQLite's
-- JSON functions; the PostgreSQL file does the same with its own).

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, 'reason', r.key, SUM(r.value)
FROM shards s, json_each(s.rejects_by_reason) r
WHERE s.status = 'registered' AND json_valid(s.rejects_by_reason) AND json_type(s.rejects_by_reason) = 'object'
GROUP BY s.recipe_id, r.key;

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, 'genre', json_extract(g.value, '$[0]'), SUM(json_extract(g.value, '$[1]'))
FROM shards s, json_each(s.label_summary, '$.genres') g
WHERE s.status = 'registered' AND json_valid(s.label_summary) AND json_type(s.label_summary, '$.genres') = 'array'
GROUP BY s.recipe_id, json_extract(g.value, '$[0]');

INSERT INTO registered_tallies (recipe_id, kind, label, total)
SELECT s.recipe_id, 'audience', json_extract(a.value, '$[0]'), SUM(json_extract(a.value, '$[1]'))
FROM shards s, json_each(s.label_summary, '$.audiences') a
WHERE s.status = 'registered' AND json_valid(s.label_summary) AND json_type(s.label_summary, '$.audiences') = 'array'
GROUP BY s.recipe_id, json_extract(a.value, '$[0]');
