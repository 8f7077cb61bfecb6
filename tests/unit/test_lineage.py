"""The OpenLineage parts of a shard task's events (maga_tasks/lineage_facets.py): dataset
names after the storage, outputs only once the shard's files exist, and our facets valid
against the schema shipped beside them. The events of a real run: tests/e2e/test_openlineage.py."""

from __future__ import annotations

import pytest

from maga_tasks import lineage_facets
from maga_tasks.recipe import load_recipe
from tests.support.lineage import validate_facet
from tests.support.paths import REPO

pytestmark = pytest.mark.airflow  # the OpenLineage provider and client: the `airflow` extra

RECIPE = load_recipe()


def summary(root: str, **fields) -> dict:
    rid = RECIPE.recipe_id
    return {
        "shard": "part-0007", "source_uri": "s3://corpus/drops/part-0007.parquet", "recipe_id": rid,
        "status": "registered", "data_uri": f"{root}/{rid}/data/part-0007.parquet",
        "rejected_uri": f"{root}/{rid}/rejected/part-0007.parquet", "documents": 4, "accepted": 15, "rejected": 5,
        "prompt_tokens": 900, "completion_tokens": 1200, "expansion_ratio": 3.25, "checksum": "abc123",
        "quality_success": True, "failed_expectations": [], **fields,
    }


ROW = {"status": "registered", "documents": 4, "accepted": 15, "rejected": 5, "rejects_by_reason": {"too_short": 5},
       "prompt_tokens": 900, "completion_tokens": 1200, "expansion_ratio": 3.25, "checksum": "abc123"}


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://corpus/drops/2025-01-01/part-0000.parquet", ("s3://corpus", "drops/2025-01-01/part-0000.parquet")),
        ("/data/maga/corpus/part-0000.jsonl.gz", ("file", "/data/maga/corpus/part-0000.jsonl.gz")),
        ("file:///data/maga/corpus/part-0000.parquet", ("file", "/data/maga/corpus/part-0000.parquet")),
    ],
)
def test_datasets_are_named_after_their_storage(uri, expected):
    assert lineage_facets.dataset_name(uri) == expected


def test_a_registered_s3_shard_has_its_source_in_and_its_three_files_out():
    record = lineage_facets.shard_record(summary("s3://out/maga"), RECIPE, ROW)
    lineage = lineage_facets.shard_lineage({}, record)
    rid = RECIPE.recipe_id
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://corpus", "drops/part-0007.parquet")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        ("s3://out", f"maga/{rid}/{kind}/part-0007.parquet") for kind in ("data", "rejected", "magacorpus")
    ]
    assert [d.outputFacets.get("outputStatistics") and d.outputFacets["outputStatistics"].rowCount
            for d in lineage.outputs] == [15, 5, None]
    shard = lineage.run_facets["magaShard"]
    assert (shard.rejectedByReason, shard.yieldShare, shard.qualityGatePassed) == ({"too_short": 5}, 0.75, True)


def test_facets_serialize_to_what_their_schema_allows():
    from openlineage.client.serde import Serde

    lineage = lineage_facets.shard_lineage({}, lineage_facets.shard_record(summary("/out"), RECIPE, ROW))
    for name, facet in lineage.run_facets.items():
        assert validate_facet("run", name, Serde.to_dict(facet)) == "ours"
    broken = Serde.to_dict(lineage.run_facets["magaShard"]) | {"yieldShare": 1.5}
    with pytest.raises(AssertionError, match="yieldShare"):
        validate_facet("run", "magaShard", broken)


def test_a_shard_without_files_has_no_outputs_and_start_has_only_the_source():
    unusable = summary("/out", status="quarantined", checksum=None)
    for key in ("documents", "accepted", "rejected", "prompt_tokens", "completion_tokens", "expansion_ratio"):
        unusable.pop(key)
    record = lineage_facets.shard_record(unusable, RECIPE, {**ROW, "status": "quarantined", "checksum": None})
    assert lineage_facets.shard_lineage({}, record).outputs == []
    start = lineage_facets.shard_lineage({"source_uri": "/in/part-0007.parquet"}, None)
    assert [(d.namespace, d.name) for d in start.inputs] == [("file", "/in/part-0007.parquet")]
    assert start.outputs == [] and start.run_facets == {}


def _lineage_active(**env: str) -> bool:
    """`lineage_active()` in a fresh interpreter (the provider caches its decision) whose
    environment has no OpenLineage setting but `env`."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if "OPENLINEAGE" not in k}
    done = subprocess.run(
        [sys.executable, "-c", "from maga_tasks.lineage import lineage_active; print(lineage_active())"],
        env={**clean, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout.strip().splitlines()[-1] == "True"


def test_lineage_is_off_until_a_transport_is_configured(tmp_path):
    assert _lineage_active() is False
    transport = '{"type": "file", "log_file_path": "%s"}' % (tmp_path / "events.jsonl")
    assert _lineage_active(AIRFLOW__OPENLINEAGE__TRANSPORT=transport) is True
    assert _lineage_active(AIRFLOW__OPENLINEAGE__TRANSPORT=transport, AIRFLOW__OPENLINEAGE__DISABLED="True") is False
