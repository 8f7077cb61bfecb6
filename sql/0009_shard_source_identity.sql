-- The version of its source a shard was made from: `sha256:{hex}` of the source file's
-- bytes as the expansion read them (`data.checkpoint`), kept with the shard's figures so
-- a registered shard says which bytes its rows come from.

ALTER TABLE shards ADD COLUMN source_identity TEXT;
