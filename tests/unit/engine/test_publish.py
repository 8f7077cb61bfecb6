"""The gate + commit of a shard task without a registry (publish_shard on SQLite and
PostgreSQL: tests/integration/test_publish.py)."""

from __future__ import annotations

import os

from maga_tasks.data.layout import shard_paths
from maga_tasks.recipe import load_recipe
from tests.support.shards import committed_source, write_source_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id
PAIRS = RECIPE.pairs_per_document


def test_commit_and_validate_commits_a_checkpoint_bigger_than_one_batch(tmp_path):
    """The gate + commit that `maga bench --scale` measures: a checkpoint of 260
    documents (more than a source batch of 256 documents and a written batch of 500
    rows) is committed to the same rows, which pass the output gate."""
    import pyarrow.parquet as pq

    from maga_tasks.data.checkpoint import Checkpoint
    from maga_tasks.data.storage import LocalStorage
    from maga_tasks.engine.publish import commit_and_validate

    source, out = committed_source(tmp_path, documents=260)
    paths = shard_paths(out, RID, "part-0000")
    rows = pq.read_table(paths.data).to_pylist() + pq.read_table(paths.rejected).to_pylist()
    by_document: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (r["source_id"], r["pair_index"])):
        row = {"reject_reason": None, "reject_detail": None} | row
        by_document.setdefault(row["source_id"], []).append(row | {"created_at": row["created_at"].isoformat()})
    write_source_shard(source, [{"id": sid, "text": "x" * rs[0]["source_chars"]} for sid, rs in by_document.items()])
    checkpoint = Checkpoint(LocalStorage(), paths.work, {})
    for index, document_rows in enumerate(by_document.values()):
        checkpoint.append(index, document_rows)
    checkpoint.close()
    expected_ids = sorted(pq.read_table(paths.data)["id"].to_pylist())
    for uri in (paths.data, paths.rejected):
        os.remove(uri)

    report = commit_and_validate(source, out, RECIPE)
    assert report.success, report.failed_names
    assert report.statistics["figures"]["documents"] == 260 and report.labels["rows"] == 260 * (PAIRS - 1)
    assert sorted(pq.read_table(paths.data)["id"].to_pylist()) == expected_ids
    assert pq.ParquetFile(paths.data).metadata.num_row_groups > 1
    export = pq.read_table(paths.export).to_pylist()
    assert len(export) == len(expected_ids) and export[0]["meta"]["raw_text"] == "x" * rows[0]["source_chars"]
