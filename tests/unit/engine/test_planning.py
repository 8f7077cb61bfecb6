"""Planning without a registry: source files and their shard names, dated shard names,
and when a run continues in another and what it carries (planning against the registry
on SQLite and PostgreSQL: tests/integration/test_planning.py)."""

from __future__ import annotations

from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.continuation import continuation, should_continue
from maga_tasks.engine.planning import RunPlan, dated_shard_name, source_shards
from maga_tasks.recipe import load_recipe

RECIPE = load_recipe()
RID = RECIPE.recipe_id


def test_two_files_with_one_shard_name_are_skipped_and_the_rest_planned(tmp_path, caplog):
    write_sample_corpus(tmp_path / "mixed", 1, 1, fmt="parquet")
    write_sample_corpus(tmp_path / "mixed", 1, 1, fmt="jsonl")
    write_sample_corpus(tmp_path / "other", 2, 1, fmt="parquet")
    (tmp_path / "other" / "part-0001.parquet").rename(tmp_path / "mixed" / "part-0001.parquet")
    assert source_shards(str(tmp_path / "mixed")) == [(str(tmp_path / "mixed" / "part-0001.parquet"), "part-0001")]
    skipped = [r.getMessage() for r in caplog.records if "give the shard name part-0000" in r.getMessage()]
    assert len(skipped) == 2


def test_dated_shard_names():
    assert dated_shard_name("2026-11-01", "s3://b/drops/2026-11-01/part-0003.jsonl.gz") == "2026-11-01_part-0003"


def test_a_run_continues_only_past_its_limit_after_progress_and_within_the_budget():
    def after(pending: list[str], mode: str = "dated") -> RunPlan:
        return RunPlan(mode=mode, ds="2026-11-01" if mode == "dated" else None, recipe_id=RID, candidates=4,
                       shards=[], held_back=pending, retried=0, registered=0, quarantined=0, failed=[])

    planned = [{"source_uri": f"/drops/{name}.parquet", "shard": name} for name in ("a", "b")]
    assert should_continue(planned, after(["b", "c"]))  # c was held back, a got done
    assert not should_continue(planned, after(["a", "b", "c"]))  # every try failed: a chain would not end
    assert not should_continue(planned, after(["b"]))  # nothing held back: the partition is all planned
    # Flat: the same, and only while the night's budget lasts.
    assert should_continue(planned, after(["b", "c"], mode="flat"), budget_left=3)
    assert not should_continue(planned, after(["b", "c"], mode="flat"), budget_left=0)  # budget spent
    assert not should_continue(planned, after(["b", "c"], mode="flat"))  # no budget: nothing to go on with
    assert not should_continue(planned, after(["a", "b", "c"], mode="flat"), budget_left=3)  # no progress
    assert not should_continue(planned, after([], mode="flat"), budget_left=3)  # the corpus is done


def test_a_continuation_is_named_after_its_run_and_carries_what_is_left():
    params = {"planning_mode": "flat", "shards_per_run": 0, "requeue": ["part-0001"], "partition_ds": None}
    flat = {"continue": True, "mode": "flat", "ds": None, "budget_left": 1200, "pending": 5000}
    first = continuation(flat, params, "scheduled__2026-11-01T02:00:00+00:00")
    # A retry of the asking task asks for the same run (Airflow then skips it: it exists).
    assert first == continuation(flat, params, "scheduled__2026-11-01T02:00:00+00:00")
    assert first.run_id.startswith("continue__flat__") and len(first.run_id) == len("continue__flat__") + 12
    # The rest of the night's budget, as a number (not auto again), and nothing requeued twice.
    assert first.conf == {**params, "shards_per_run": 1200, "requeue": []}
    assert "1200 shard(s) left" in first.note and "5000 shard(s) to publish" in first.note
    # Its own continuation is another run.
    assert continuation(flat, first.conf, first.run_id).run_id != first.run_id

    dated = {"continue": True, "mode": "dated", "ds": "2026-11-01", "budget_left": None, "pending": 30}
    further = continuation(dated, {**params, "planning_mode": "dated"}, "manual__x")
    assert further.run_id.startswith("continue__2026-11-01__")
    assert further.conf["partition_ds"] == "2026-11-01" and further.conf["shards_per_run"] == 0
    assert continuation({**dated, "continue": False}, params, "manual__x") is None
