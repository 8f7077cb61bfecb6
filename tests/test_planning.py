"""Planning on SQLite and PostgreSQL: flat budgets in name order, dated partitions with
date-prefixed shard names, registered and quarantined shards left out."""

from __future__ import annotations

import pytest
from conftest import write_committed_shard

from maga_tasks.engine.planning import (
    PlanningError,
    dated_shard_name,
    plan_shards,
    source_shards,
)
from maga_tasks.engine.publish import publish_shard
from maga_tasks.recipe import load_recipe
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.settings import RunSettings

RECIPE = load_recipe()
RID = RECIPE.recipe_id
DEAD = RunSettings(endpoints=("http://127.0.0.1:9",), all_down_timeout_s=0.5, max_attempts=1)


def test_flat_plans_the_first_unregistered_shards_within_the_budget(tmp_path, registry):
    files = write_sample_corpus(tmp_path / "corpus", 5, 2)
    source = str(tmp_path / "corpus")
    first = plan_shards(source, RID, registry, mode="flat", budget=2)
    assert first == [{"source_uri": str(files[0]), "shard": "part-0000"}, {"source_uri": str(files[1]), "shard": "part-0001"}]

    # The first shard gets published, the second quarantined: the next night moves on.
    out = str(tmp_path / "out")
    write_committed_shard(out, RECIPE, "part-0000")
    assert publish_shard(str(files[0]), out, RECIPE, DEAD, registry, owner="w")["status"] == "registered"
    registry.quarantine(RID, "part-0001", "output quality gate failed", [])
    assert [d["shard"] for d in plan_shards(source, RID, registry, mode="flat", budget=2)] == ["part-0002", "part-0003"]
    assert [d["shard"] for d in plan_shards(source, RID, registry, mode="flat", budget=None)] == [
        "part-0002", "part-0003", "part-0004",
    ]
    assert plan_shards(source, RID, registry, mode="flat", budget=0) == []
    assert registry.totals(RID)["by_status"]["planned"] == 3


def test_dated_plans_the_partition_of_the_run_date(tmp_path, registry):
    write_sample_corpus(tmp_path / "drops", 2, 2, partitions=["2026-11-01", "2026-11-02"])
    source = str(tmp_path / "drops" / "{ds}")
    day1 = plan_shards(source, RID, registry, mode="dated", ds="2026-11-01", budget=None)
    day2 = plan_shards(source, RID, registry, mode="dated", ds="2026-11-02", budget=None)
    assert [d["shard"] for d in day1] == ["2026-11-01_part-0000", "2026-11-01_part-0001"]
    assert [d["shard"] for d in day2] == ["2026-11-02_part-0000", "2026-11-02_part-0001"]
    assert day1[0]["source_uri"] == str(tmp_path / "drops" / "2026-11-01" / "part-0000.parquet")
    assert plan_shards(source, RID, registry, mode="dated", ds="2026-11-03", budget=None) == []  # not landed
    assert plan_shards(source, RID, registry, mode="dated", ds="2026-11-01", budget=1) == day1[:1]


def test_a_dated_shard_is_published_under_its_dated_name(tmp_path, registry):
    write_sample_corpus(tmp_path / "drops", 1, 2, partitions=["2026-11-01"])
    (descriptor,) = plan_shards(str(tmp_path / "drops" / "{ds}"), RID, registry, mode="dated", ds="2026-11-01", budget=None)
    out = str(tmp_path / "out")
    write_committed_shard(out, RECIPE, descriptor["shard"])
    summary = publish_shard(descriptor["source_uri"], out, RECIPE, DEAD, registry, owner="w", shard=descriptor["shard"])
    assert summary["status"] == "registered" and summary["shard"] == "2026-11-01_part-0000"
    assert summary["data_uri"].endswith("/data/2026-11-01_part-0000.parquet")
    assert plan_shards(str(tmp_path / "drops" / "{ds}"), RID, registry, mode="dated", ds="2026-11-01", budget=None) == []


def test_planning_parameters_are_checked(tmp_path, registry):
    write_sample_corpus(tmp_path / "drops", 1, 1, partitions=["2026-11-01"])
    with pytest.raises(PlanningError, match="YYYY-MM-DD"):
        plan_shards(str(tmp_path / "drops" / "{ds}"), RID, registry, mode="dated", ds="20261101", budget=None)
    with pytest.raises(PlanningError, match="needs '\\{ds\\}'"):
        plan_shards(str(tmp_path / "drops"), RID, registry, mode="dated", ds="2026-11-01", budget=None)
    with pytest.raises(PlanningError, match="mode='dated'"):
        plan_shards(str(tmp_path / "drops" / "{ds}"), RID, registry, mode="flat", ds=None, budget=None)
    with pytest.raises(PlanningError, match="budget"):
        plan_shards(str(tmp_path / "drops"), RID, registry, mode="flat", ds=None, budget=-1)


def test_two_files_with_one_shard_name_are_refused(tmp_path):
    write_sample_corpus(tmp_path / "mixed", 1, 1, fmt="parquet")
    write_sample_corpus(tmp_path / "mixed", 1, 1, fmt="jsonl")
    with pytest.raises(PlanningError, match="part-0000"):
        source_shards(str(tmp_path / "mixed"))


def test_dated_shard_names():
    assert dated_shard_name("2026-11-01", "s3://b/drops/2026-11-01/part-0003.jsonl.gz") == "2026-11-01_part-0003"


@pytest.mark.integration
def test_dated_planning_on_s3(s3_env, registry, tmp_path):
    import boto3

    from maga_tasks.data.storage import storage_for

    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="drops")
    local = write_sample_corpus(tmp_path / "drops", 2, 1, partitions=["2026-11-01"])
    storage = storage_for("s3://drops")
    for path in local:
        storage.put_file(f"s3://drops/corpus/2026-11-01/{path.name}", path)
    planned = plan_shards("s3://drops/corpus/{ds}/", RID, registry, mode="dated", ds="2026-11-01", budget=None)
    assert planned == [
        {"source_uri": "s3://drops/corpus/2026-11-01/part-0000.parquet", "shard": "2026-11-01_part-0000"},
        {"source_uri": "s3://drops/corpus/2026-11-01/part-0001.parquet", "shard": "2026-11-01_part-0001"},
    ]
    assert plan_shards("s3://drops/corpus/{ds}/", RID, registry, mode="dated", ds="2026-11-02", budget=None) == []


@pytest.mark.integration
def test_a_dated_shard_is_expanded_under_its_dated_name(tmp_path, registry, llm_server):
    """Needs expand_shard(..., shard=...) so that the output is named after the shard."""
    write_sample_corpus(tmp_path / "drops", 1, 4, partitions=["2026-11-01", "2026-11-02"])
    out = str(tmp_path / "out")
    settings = RunSettings(endpoints=(llm_server.url,), max_concurrency=16)
    for ds in ("2026-11-01", "2026-11-02"):
        (descriptor,) = plan_shards(str(tmp_path / "drops" / "{ds}"), RID, registry, mode="dated", ds=ds, budget=None)
        summary = publish_shard(descriptor["source_uri"], out, RECIPE, settings, registry, owner="w", shard=descriptor["shard"])
        assert summary["status"] == "registered", summary
        assert summary["data_uri"].endswith(f"/data/{ds}_part-0000.parquet")
    assert registry.totals(RID)["registered_shards"] == 2
