"""Token count of one registered shard: the logic of the example downstream DAG
`maga_shard_token_count`, which runs once per shard announced on the partitioned asset
`maga://corpus/shards` (`engine.assets`).

It reads what the announcement names, checks that the bytes are the ones registered
(the checksum) and writes `{counts_root}/{recipe_id}/{shard}.json`: the published rows
and the completion tokens they and the whole shard cost.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from maga_tasks.data.storage import join, storage_for
from maga_tasks.errors import EXIT_BAD_INPUT, MagaError

# Token columns of the data and rejected files: the rewrite's own and the pairs call's.
_TOKEN_COLUMNS = ("completion_tokens", "pairs_completion_tokens")


class ShardChanged(MagaError):
    """The shard's files are not the ones announced (requeued or rewritten since): a
    retry reads the same files, so it cannot help; the next announcement will."""

    exit_code = EXIT_BAD_INPUT
    retryable = False


def counts_uri(counts_root: str, recipe_id: str, shard: str) -> str:
    return join(counts_root, recipe_id, f"{shard}.json")


def default_counts_root(corpus_uri: str) -> str:
    """Beside the corpus versions, never inside one: `{output_root}/_token_counts`."""
    return join(corpus_uri.rstrip("/").rsplit("/", 1)[0], "_token_counts")


def count_shard_tokens(extra: dict, *, counts_root: str | None = None, s3_endpoint_url: str | None = None) -> dict:
    """Count the tokens of the shard an asset event announced (its `extra`, as
    `engine.assets.shard_event_extra` made it) and write the count; returns it.
    Raises `ShardChanged` when the files do not have the announced checksum."""
    import pyarrow.parquet as pq

    from maga_tasks.data.committed import files_checksum, local_files

    storage = storage_for(extra["data_uri"], s3_endpoint_url)
    with local_files(storage, extra["data_uri"], extra["rejected_uri"]) as (data, rejected):
        checksum = files_checksum(data, rejected)
        if checksum != extra["checksum"]:
            raise ShardChanged(
                f"shard {extra['shard']} of {extra['recipe_id']}: its files hold checksum {checksum[:12]},"
                f" not the announced {extra['checksum'][:12]}"
            )
        sums = {}
        for name, path in (("data", data), ("rejected", rejected)):
            columns = [c for c in _TOKEN_COLUMNS if c in pq.read_schema(path).names]
            table = pq.read_table(path, columns=columns)
            sums[name] = {c: int(table.column(c).fill_null(0).to_numpy().sum()) if table.num_rows else 0
                          for c in columns}
            sums[name]["rows"] = table.num_rows
    count = {
        "recipe_id": extra["recipe_id"],
        "shard": extra["shard"],
        "checksum": checksum,
        "data_uri": extra["data_uri"],
        "rows": sums["data"]["rows"],
        # Completion tokens of the accepted rows' rewrite calls (every attempt and every
        # sample drawn for them): what this shard's published rows cost.
        "accepted_completion_tokens": sums["data"].get("completion_tokens", 0),
        # Everything generated for the shard (rejected rows and pairs calls too): the
        # registry's `completion_tokens`.
        "completion_tokens": sum(sum(v for k, v in part.items() if k != "rows") for part in sums.values()),
        "counted_at": datetime.now(UTC).isoformat(),
    }
    root = counts_root or default_counts_root(extra["corpus_uri"])
    target = counts_uri(root, extra["recipe_id"], extra["shard"])
    storage_for(target, s3_endpoint_url).put_bytes(target, json.dumps(count, indent=1).encode())
    return count | {"uri": target}


__all__ = ["ShardChanged", "count_shard_tokens", "counts_uri", "default_counts_root"]
