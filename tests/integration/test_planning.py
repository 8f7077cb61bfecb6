"""Planning on SQLite and PostgreSQL: flat budgets in name order, dated partitions with
date-prefixed shard names taken whole (in further runs past a run's limit), registered,
quarantined and failed-for-good shards left out, never-tried shards first, and
`maga plan` as a dry run (what needs no registry: tests/unit/engine/test_planning.py)."""

from __future__ import annotations

import json

import pytest

from maga_tasks.cli import main as maga
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.continuation import continuation
from maga_tasks.engine.planning import PlanningError, plan_run, plan_shards
from maga_tasks.engine.publish import publish_shard
from maga_tasks.engine.report import run_report
from maga_tasks.engine.requeue import requeue_shards
from maga_tasks.engine.shard import ShardResult
from maga_tasks.errors import ShardFailedForGood, TokenizerUnavailable
from maga_tasks.recipe import load_recipe
from maga_tasks.registry.dashboard import corpus_overview
from maga_tasks.settings import RunSettings
from tests.support.shards import write_committed_shard, write_source_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id
DEAD = RunSettings(endpoints=("http://127.0.0.1:9",), all_down_timeout_s=0.5, max_attempts=1)


def test_flat_plans_the_first_unregistered_shards_within_the_budget(tmp_path, registry):
    files = write_sample_corpus(tmp_path / "corpus", 5, 2)
    source = str(tmp_path / "corpus")
    first = plan_shards(source, RID, registry, mode="flat", budget=2)
    assert first == [
        {"source_uri": str(files[0]), "shard": "part-0000"},
        {"source_uri": str(files[1]), "shard": "part-0001"},
    ]

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
    # The budget is for flat corpora: a dated run takes its whole partition, held back
    # only by the most shards one run can map.
    assert plan_shards(source, RID, registry, mode="dated", ds="2026-11-01", budget=1) == day1
    assert plan_shards(source, RID, registry, mode="dated", ds="2026-11-01", max_shards=1) == day1[:1]


def test_a_dated_shard_is_published_under_its_dated_name(tmp_path, registry):
    write_sample_corpus(tmp_path / "drops", 1, 2, partitions=["2026-11-01"])
    drops = str(tmp_path / "drops" / "{ds}")
    (descriptor,) = plan_shards(drops, RID, registry, mode="dated", ds="2026-11-01", budget=None)
    out = str(tmp_path / "out")
    write_committed_shard(out, RECIPE, descriptor["shard"])
    summary = publish_shard(descriptor["source_uri"], out, RECIPE, DEAD, registry, owner="w", shard=descriptor["shard"])
    assert summary["status"] == "registered" and summary["shard"] == "2026-11-01_part-0000"
    assert summary["data_uri"].endswith("/data/2026-11-01_part-0000.parquet")
    assert plan_shards(drops, RID, registry, mode="dated", ds="2026-11-01", budget=None) == []


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
        summary = publish_shard(
            descriptor["source_uri"], out, RECIPE, settings, registry, owner="w", shard=descriptor["shard"]
        )
        assert summary["status"] == "registered", summary
        assert summary["data_uri"].endswith(f"/data/{ds}_part-0000.parquet")
    assert registry.totals(RID)["registered_shards"] == 2


# -- whole partitions, failing shards, dry runs ------------------------------------------


def _publish(plan, out, recipe, settings, registry) -> list[dict]:
    """What the DAG's mapped tasks do with a plan: publish each of its shards."""
    return [
        publish_shard(d["source_uri"], out, recipe, settings, registry, owner=f"w:{d['shard']}", shard=d["shard"])
        for d in plan.shards
    ]


@pytest.mark.integration
def test_a_dated_partition_is_published_whole_in_as_many_runs_as_it_needs(tmp_path, registry, llm_server):
    """The continuation the DAG does past Airflow's max_map_length, with the library's
    functions (tests/e2e/test_airflow_e2e.py runs such a partition through Airflow)."""
    write_sample_corpus(tmp_path / "drops", 7, 1, partitions=["2026-11-01"])
    source, out = str(tmp_path / "drops" / "{ds}"), str(tmp_path / "out")
    settings = RunSettings(endpoints=(llm_server.url,), max_concurrency=8)
    options = {"mode": "dated", "ds": "2026-11-01", "budget": 2, "max_failures": 3}
    # The flat budget of 2 does not cut a partition: one run could take all 7 files.
    assert len(plan_run(source, RID, registry, **options, record=False).shards) == 7

    reports = []
    while not reports or reports[-1]["continue"]:
        assert len(reports) < 4, reports
        plan = plan_run(source, RID, registry, **options, max_shards=4)  # a run maps at most 4
        summaries = _publish(plan, out, RECIPE, settings, registry)
        after = plan_run(source, RID, registry, **options, record=False)
        reports.append(run_report(summaries, registry, RID, planned=plan.shards, after=after))

    assert [r["run_shards"] for r in reports] == [4, 3]
    assert [(r["left"], r["complete"], r["continue"]) for r in reports] == [(3, False, True), (0, True, False)]
    assert registry.totals(RID)["registered_shards"] == 7
    manifest = reports[0]["manifest"]
    assert len(manifest) == 4 and set(manifest[0]) == {"shard", "data_uri", "checksum"}
    for entry in manifest:
        assert entry["checksum"] == registry.shard(RID, entry["shard"])["checksum"]
        assert entry["data_uri"].endswith(f"/data/{entry['shard']}.parquet")
    # Nothing is left to continue once the partition is complete.
    assert plan_run(source, RID, registry, **options, record=False).left == 0


def _register_as_a_task_does(registry, descriptor: dict) -> dict:
    """A mapped task's registry writes (lease, register under its token), without the
    expansion and gates; its summary as the task's XCom has it."""
    shard, uri = descriptor["shard"], descriptor["source_uri"]
    token = registry.lease(RID, shard, uri, f"w:{shard}", 60)
    result = ShardResult(shard, uri, RID, f"/out/data/{shard}.parquet", f"/out/rejected/{shard}.parquet", documents=1)
    assert registry.register(RID, shard, result, f"sha-{shard}", token=token)
    return {"shard": shard, "status": "registered", "data_uri": result.data_uri, "checksum": f"sha-{shard}"}


def test_a_flat_budget_above_the_run_limit_is_published_in_continuations_and_no_more(tmp_path, registry):
    """The DAG's flat night with the library's functions: a budget of 5 over a corpus of 7,
    at most 2 shards a run; every plan records only the shards it maps
    (tests/e2e/test_airflow_e2e.py runs such a night through Airflow, with the whole
    publish path)."""
    files = [str(f) for f in write_sample_corpus(tmp_path / "corpus", 7, 1)]
    source = str(tmp_path / "corpus")
    params, run_id, reports = {"shards_per_run": 5, "requeue": []}, "scheduled__night", []
    while True:
        assert len(reports) < 5, reports
        plan = plan_run(source, RID, registry, mode="flat", budget=params["shards_per_run"], max_shards=2)
        # Only the shards this run maps are recorded; the others stay unknown to the registry.
        assert {row["shard"] for row in registry.shards(RID, "planned")} == {d["shard"] for d in plan.shards}
        summaries = [_register_as_a_task_does(registry, d) for d in plan.shards]
        after = plan_run(source, RID, registry, mode="flat", record=False)
        reports.append(run_report(summaries, registry, RID, planned=plan.shards, after=after,
                                  budget=params["shards_per_run"]))
        further = continuation(reports[-1], params, run_id)
        if further is None:
            break
        params, run_id = further.conf, further.run_id

    assert [(r["run_shards"], r["budget"], r["budget_left"], r["continue"]) for r in reports] == [
        (2, 5, 3, True), (2, 3, 1, True), (1, 1, 0, False),
    ]
    assert sorted(registered["shard"] for registered in registry.shards(RID, "registered")) == [
        f"part-{i:04d}" for i in range(5)
    ]
    assert reports[-1]["left"] == 2 and not reports[-1]["complete"]  # the next night's
    assert registry.shard(RID, "part-0005") is None and files[5].endswith("part-0005.parquet")


def _poisoned_corpus(tmp_path, shards: int = 4):
    """A flat corpus whose first shard is one document over the context budget, and a
    recipe whose tokenizer (needed to cut it) cannot be loaded: every try fails."""
    files = write_sample_corpus(tmp_path / "corpus", shards, 1)
    write_source_shard(files[0], [{"id": "huge", "text": "River deltas form where sediment settles. " * 200}])
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("not a tokenizer")
    return load_recipe(tokenizer=str(broken)), [str(f) for f in files]


@pytest.mark.integration
def test_a_shard_failing_every_try_is_failed_for_good_and_fresh_shards_go_first(tmp_path, registry, llm_server):
    recipe, files = _poisoned_corpus(tmp_path)
    rid, source, out = recipe.recipe_id, str(tmp_path / "corpus"), str(tmp_path / "out")
    settings = RunSettings(endpoints=(llm_server.url,), max_concurrency=8, max_shard_failures=3)

    def publish_poisoned():
        return publish_shard(files[0], out, recipe, settings, registry, owner="w")

    with pytest.raises(TokenizerUnavailable):
        publish_poisoned()
    row = registry.shard(rid, "part-0000")
    assert row["status"] == "planned" and row["attempts"] == 1 and "TokenizerUnavailable" in row["last_error"]
    # Never-tried shards come first; the retried one waits behind them.
    assert [d["shard"] for d in plan_shards(source, rid, registry, budget=2, max_failures=3)] == [
        "part-0001", "part-0002",
    ]
    assert [d["shard"] for d in plan_shards(source, rid, registry, max_failures=3)] == [
        "part-0001", "part-0002", "part-0003", "part-0000",
    ]

    with pytest.raises(TokenizerUnavailable):
        publish_poisoned()
    with pytest.raises(ShardFailedForGood, match="failed for good after 3 tries") as third:
        publish_poisoned()
    assert isinstance(third.value.__cause__, TokenizerUnavailable)
    row = registry.shard(rid, "part-0000")
    assert row["status"] == "failed" and row["attempts"] == 3 and "cannot load tokenizer" in row["last_error"]
    requests = llm_server.stats()["requests_total"]
    with pytest.raises(ShardFailedForGood):  # a further try is refused before any work
        publish_poisoned()
    assert registry.shard(rid, "part-0000")["attempts"] == 3 and llm_server.stats()["requests_total"] == requests

    # It leaves the plan, is counted as left, and shows on the dashboard.
    plan = plan_run(source, rid, registry, max_failures=3, record=False)
    assert plan.pending == ["part-0001", "part-0002", "part-0003"] and plan.failed == ["part-0000"]
    assert plan.left == 4 and plan.summary()["skipped"]["failed"] == 1
    overview = corpus_overview(registry, recipe_id=rid)
    assert overview["totals"]["by_status"]["failed"] == 1
    (shown,) = [r for r in overview["recipes"][0]["shards"] if r["shard"] == "part-0000"]
    assert shown["status"] == "failed" and shown["attempts"] == 3 and "tokenizer" in shown["last_error"]

    # The others publish; requeued, the failed one is planned again with its tries from zero.
    assert all(s["status"] == "registered" for s in _publish(plan, out, recipe, settings, registry))
    (item,) = requeue_shards(registry, out, rid, ["part-0000"])
    assert item["requeued"] and registry.shard(rid, "part-0000")["attempts"] == 0
    assert [d["shard"] for d in plan_shards(source, rid, registry, max_failures=3)] == ["part-0000"]


def _registry_state(registry, recipe_id: str) -> tuple:
    shards = registry.shards(recipe_id)
    return shards, {s["shard"]: registry.events(recipe_id, s["shard"]) for s in shards}


def test_maga_plan_prints_what_a_run_would_do_and_writes_nothing(tmp_path, registry_url, registry, capsys):
    files = [str(f) for f in write_sample_corpus(tmp_path / "corpus", 5, 2)]
    source, out = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_committed_shard(out, RECIPE, "part-0000")
    assert publish_shard(files[0], out, RECIPE, DEAD, registry, owner="w")["status"] == "registered"
    registry.quarantine(RID, "part-0001", "output quality gate failed", [], source_uri=files[1])
    for _ in range(3):  # part-0002 fails three tries of its own: failed for good
        assert registry.lease(RID, "part-0002", files[2], "w", 60)
        registry.mark_failed(RID, "part-0002", "ValueError: boom", owner="w", max_failures=3)
    assert registry.lease(RID, "part-0003", files[3], "w", 60)  # part-0003 failed once: retried later
    assert registry.mark_failed(RID, "part-0003", "ValueError: boom", owner="w", max_failures=3) == "planned"
    before = _registry_state(registry, RID)

    assert maga(["plan", source, "--registry", registry_url, "--budget", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert plan["publish"] == [{"source_uri": files[4], "shard": "part-0004"}]  # never tried: first
    assert plan["skipped"] == {"registered": 1, "quarantined": 1, "failed": 1}
    assert plan["failed_shards"] == ["part-0002"] and plan["held_back"] == 1 and plan["left"] == 3
    assert plan["candidates"] == 5 and plan["recipe_id"] == RID and plan["mode"] == "flat"
    assert _registry_state(registry, RID) == before  # nothing leased, planned or recorded
    assert registry.shard(RID, "part-0004") is None

    # --budget 0: derived from the fleet as the DAG does (one registered shard is too
    # little history: 1 h a shard), so 2 slots x 1 h publish both pending shards.
    assert maga(["plan", source, "--registry", registry_url, "--budget", "0", "--pool-slots", "2",
                 "--run-hours", "1"]) == 0
    captured = capsys.readouterr()
    derived = json.loads(captured.out.strip().splitlines()[-1])
    assert derived["budget"]["derived"] and derived["budget"]["shards"] == 2
    assert [d["shard"] for d in derived["publish"]] == ["part-0004", "part-0003"]
    assert "budget 2 shard(s) = 2 slot(s) x 1 h / 1.000 h per shard (no history yet: fallback)" in captured.err

    # Dated: the whole partition, whatever the budget; the text summary goes to stderr.
    write_sample_corpus(tmp_path / "drops", 3, 1, partitions=["2026-11-01"])
    args = ["plan", str(tmp_path / "drops" / "{ds}"), "--registry", registry_url, "--planning-mode", "dated",
            "--ds", "2026-11-01", "--budget", "1"]
    assert maga(args) == 0
    captured = capsys.readouterr()
    dated = json.loads(captured.out.strip().splitlines()[-1])
    assert [d["shard"] for d in dated["publish"]] == [f"2026-11-01_part-000{i}" for i in range(3)]
    assert "a run would publish 3" in captured.err
    assert _registry_state(registry, RID) == before
