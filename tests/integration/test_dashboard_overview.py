"""The dashboard's figures straight from the registry (SQLite and PostgreSQL), without
Airflow: the page of shards carries each shard's latest gate results and the Airflow task
that last held it, and reading it costs the same few queries however many shards there are."""

from __future__ import annotations

from sqlalchemy import event

from maga_tasks.engine.publish import publish_shard
from maga_tasks.recipe import load_recipe
from maga_tasks.registry.dashboard import corpus_overview
from maga_tasks.settings import RunSettings
from tests.support.shards import write_committed_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id
# Nothing listens here: committed shards need no LLM request.
DEAD = RunSettings(endpoints=("http://127.0.0.1:9",), all_down_timeout_s=0.5, max_attempts=1, backoff_base_s=0)


def owner(shard: str) -> str:
    return f"airflow:maga_corpus_expansion/publish_shard/{int(shard[-4:])}/scheduled__2026-11-01"


def publish_committed(tmp_path, registry, shards: list[str], defective: str | None = None) -> str:
    out = str(tmp_path / "out")
    for shard in shards:
        write_committed_shard(out, RECIPE, shard, defects=("duplicate_ids",) if shard == defective else ())
        publish_shard(str(tmp_path / "source" / f"{shard}.parquet"), out, RECIPE, DEAD, registry, owner=owner(shard))
    return out


def count_queries(registry):
    counted = []
    event.listen(registry.engine, "before_cursor_execute", lambda *args: counted.append(args[2]))
    return counted


def test_overview_shows_each_shards_quality_and_task(tmp_path, registry):
    names = [f"part-{i:04d}" for i in range(4)]
    publish_committed(tmp_path, registry, names, defective="part-0002")
    registry.plan([("s3://elsewhere/part-0000.parquet", "part-0000")], "other-recipe")

    overview = corpus_overview(registry)

    versions = {v["recipe"]["recipe_id"]: v for v in overview["recipes"]}
    assert set(versions) == {RID, "other-recipe"}  # a planned recipe without its row is listed too
    rows = {row["shard"]: row for row in versions[RID]["shards"]}
    assert set(rows) == set(names)
    for name, row in rows.items():
        latest = registry.quality_results(RID, name)[-1]
        assert row["quality"]["output"]["success"] == latest["success"] == (name != "part-0002")
        assert row["quality"]["output"]["failed_expectations"] == (latest["failed_expectations"] or [])
        assert row["airflow_task"]["map_index"] == int(name[-4:])
        assert row["airflow_task"]["ui_path"].endswith(f"/tasks/publish_shard/mapped/{int(name[-4:])}")
    assert rows["part-0002"]["status"] == "quarantined"
    # The page links what exists: Data Docs for the failed shard, the JSON result for the others.
    for name, row in rows.items():
        report = row["quality"]["output"]["report"]
        folder = tmp_path / "out" / RID / "quality" / name
        if name == "part-0002":
            assert report["kind"] == "data_docs" and report["label"] == "Data Docs"
            assert report["href"] == f"file://{folder}/output/index.html"
            assert (folder / "output" / "index.html").is_file()
        else:
            assert report["kind"] == "json" and report["label"] == "result JSON"
            assert report["href"] == f"file://{folder}/output.json" and (folder / "output.json").is_file()
            assert not (folder / "output").exists()
    assert versions[RID]["totals"]["registered_shards"] == 3
    assert [row["shard"] for row in versions[RID]["shards"]] == [
        s["shard"] for s in sorted(registry.shards(RID), key=lambda s: s["updated_at"], reverse=True)
    ]


def test_overview_queries_do_not_grow_with_the_shards(tmp_path, registry):
    publish_committed(tmp_path / "a", registry, ["part-0000", "part-0001"])
    queries = count_queries(registry)
    corpus_overview(registry)
    with_two = len(queries)

    publish_committed(tmp_path / "b", registry, [f"part-{i:04d}" for i in range(2, 8)])
    queries.clear()
    overview = corpus_overview(registry)
    assert len(overview["recipes"][0]["shards"]) == 8
    assert len(queries) == with_two, queries

    page = corpus_overview(registry, recipe_id=RID, shard_limit=3)
    assert [row["shard"] for row in page["recipes"][0]["shards"]] == [
        row["shard"] for row in overview["recipes"][0]["shards"][:3]
    ]
