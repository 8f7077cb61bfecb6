"""
# Token count per registered shard (an example downstream DAG)

Runs once per shard the nightly DAG registers: it is scheduled on the partitioned asset
`maga://corpus/shards` (`PartitionedAssetTimetable`, identity mapping), whose events the
nightly `publish_shard` task emits one per newly registered shard, with the shard's
name as the partition key and, as extra, the recipe id, the corpus version's folder,
the data and rejected URIs, the checksum and the shard's figures.

**count_tokens** reads the shard's files, checks their checksum against the announced
one (a shard requeued since fails the task, without retries) and writes
`{counts_root}/{recipe_id}/{shard}.json`: the published rows, the completion tokens of
their rewrite calls (`accepted_completion_tokens`) and every completion token spent on the
shard (`completion_tokens`, the registry's figure). `counts_root` is
`MAGA_TOKEN_COUNTS_ROOT`, else `_token_counts` beside the corpus versions. S3 as for the
nightly DAG's library: `MAGA_S3_ENDPOINT_URL` and boto3's credentials.

A template for your own per-shard consumers (tokenize, mix, train): docs/operations.md,
"Downstream DAGs per shard". The logic is in `maga_tasks.engine.token_count`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from airflow.sdk import Asset, PartitionedAssetTimetable, dag, task

from maga_tasks.engine.assets import SHARDS_ASSET_NAME, SHARDS_ASSET_URI

CORPUS_SHARDS = Asset(name=SHARDS_ASSET_NAME, uri=SHARDS_ASSET_URI, group="maga")


@dag(
    dag_id="maga_shard_token_count",
    # The default mapper is the identity: one run per partition key, i.e. per shard.
    schedule=PartitionedAssetTimetable(assets=CORPUS_SHARDS),
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    doc_md=__doc__,
    tags=["maga", "downstream"],
    default_args={
        "owner": "maga",
        "retries": 2,
        "retry_delay": timedelta(seconds=float(os.environ.get("MAGA_RETRY_DELAY_SECONDS", "60"))),
        "execution_timeout": timedelta(minutes=30),
    },
)
def maga_shard_token_count():
    @task
    def count_tokens(triggering_asset_events=None, dag_run=None) -> list[dict]:
        """Count the tokens of the shard this run's partition key names (one count per
        corpus version that announced a shard of that name since the last run)."""
        from airflow.sdk.exceptions import AirflowFailException

        from maga_tasks.engine.token_count import ShardChanged, count_shard_tokens

        events = [e for e in triggering_asset_events[CORPUS_SHARDS] if e.partition_key == dag_run.partition_key]
        try:
            return [count_shard_tokens(e.extra, counts_root=os.environ.get("MAGA_TOKEN_COUNTS_ROOT")) for e in events]
        except ShardChanged as error:  # the same files again: a retry cannot help
            raise AirflowFailException(str(error)) from error

    count_tokens()


maga_shard_token_count()
