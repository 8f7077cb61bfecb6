"""The shard registry on SQLite and on PostgreSQL: migrations, planning, leases (raced by
real processes), exactly-once registration, quarantine, totals."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from maga_tasks.data.fidelity_rates import FIDELITY_COUNTS
from maga_tasks.engine.shard import ShardResult
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import STATUSES, Registry, RegistryConflict, RegistryError, format_totals
from tests.support.registry import race_upgrades

RECIPE = load_recipe()
RID = RECIPE.recipe_id


def result_for(shard: str, **figures) -> ShardResult:
    values = {
        "documents": 10,
        "accepted": 42,
        "rejected": 8,
        "rejects_by_reason": {"low_keyword_coverage": 5, "truncated": 3},
        "prompt_tokens": 12_000,
        "completion_tokens": 30_000,
        "source_chars": 20_000,
        "output_chars": 90_000,
        "requests": 60,
        "seconds": 12.5,
    }
    values.update(figures)
    return ShardResult(
        shard=shard,
        source_uri=values.pop("source_uri", f"/src/{shard}.parquet"),
        recipe_id=RID,
        data_uri=f"/out/data/{shard}.parquet",
        rejected_uri=f"/out/rejected/{shard}.parquet",
        **values,
    )


# -- migrations ------------------------------------------------------------------------------


def test_upgrade_applies_each_migration_once(registry_url):
    registry = Registry(registry_url)
    versions = [version for version, _, _ in registry.migrations()]
    assert versions == sorted(versions) and versions[0] == 1
    assert registry.upgrade() == versions
    assert registry.upgrade() == []
    assert registry.schema_version() == versions[-1]
    with registry.engine.connect() as conn:
        from sqlalchemy import text

        rows = conn.execute(text("SELECT version, name FROM schema_version ORDER BY version")).all()
    assert [row[0] for row in rows] == versions
    registry.close()


def test_concurrent_upgrades_apply_each_migration_once(registry_url):
    applied = race_upgrades(registry_url, 3)
    registry = Registry(registry_url)
    every = [version for version, _, _ in registry.migrations()]
    assert sorted(v for batch in applied for v in batch) == every
    assert registry.schema_version() == every[-1]
    registry.close()


def test_a_database_newer_than_the_code_is_refused(registry, tmp_path):
    from sqlalchemy import text

    with registry.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO schema_version (version, name, checksum, applied_at) VALUES (999, 'future', 'x', 'now')")
        )
    with pytest.raises(RegistryError, match="newer"):
        registry.upgrade()


# -- recipes and planning ------------------------------------------------------------------


def test_recipes_are_recorded_once(registry):
    registry.ensure_recipe(RECIPE)
    registry.ensure_recipe(RECIPE)
    other = type(RECIPE).model_validate(RECIPE.model_dump() | {"prompt_version": RECIPE.prompt_version + "-other"})
    registry.ensure_recipe(other)
    recipes = registry.recipes()
    assert [r["recipe_id"] for r in recipes] == [RID, other.recipe_id]
    assert recipes[0]["model"] == RECIPE.model and "prompts:" in recipes[0]["recipe_yaml"]
    assert recipes[0]["shards"] == 0


def test_plan_returns_unregistered_shards_in_order(registry):
    shards = [(f"/src/part-{i:04d}.parquet", f"part-{i:04d}") for i in range(6)]  # as result_for names them
    assert registry.plan(shards, RID, limit=3) == shards[:3]
    assert {row["status"] for row in registry.shards(RID)} == {"planned"}
    assert registry.plan(shards, RID) == shards
    registry.register(RID, "part-0000", result_for("part-0000", source_uri="/src/part-0000.parquet"), "c0")
    registry.quarantine(RID, "part-0002", "output quality gate failed", [{"check": "unique_ids"}])
    assert registry.plan(shards, RID, limit=2) == [shards[1], shards[3]]
    assert registry.plan(shards, RID, include_quarantined=True)[:2] == [shards[1], shards[2]]
    assert len(registry.shards(RID)) == 6


def test_plan_refuses_two_sources_for_one_shard_name(registry):
    registry.plan([("/a/part-0000.parquet", "part-0000")], RID)
    with pytest.raises(RegistryError, match="two source files"):
        registry.plan([("/b/part-0000.parquet", "part-0000")], RID)


# -- leases --------------------------------------------------------------------------------


def test_lease_is_exclusive_until_it_expires(registry):
    assert registry.lease(RID, "s1", "/src/s1.parquet", "worker-a", ttl_s=0.5) == 1
    assert registry.lease(RID, "s1", "/src/s1.parquet", "worker-b", ttl_s=60) is None
    assert registry.lease(RID, "s1", "/src/s1.parquet", "worker-a", ttl_s=0.5) == 2  # renewal by its owner
    time.sleep(0.7)
    assert registry.lease(RID, "s1", "/src/s1.parquet", "worker-b", ttl_s=60) == 3  # takeover
    row = registry.shard(RID, "s1")
    assert row["lease_owner"] == "worker-b" and row["status"] == "leased" and row["attempts"] == 3
    assert row["lease_token"] == 3
    events = [(e["event"], e["owner"]) for e in registry.events(RID, "s1")]
    assert events == [("lease", "worker-a"), ("lease", "worker-a"), ("takeover", "worker-b")]
    assert registry.events(RID, "s1")[-1]["detail"]["previous_owner"] == "worker-a"
    assert [e["detail"]["token"] for e in registry.events(RID, "s1")] == [1, 2, 3]


def test_registered_shard_cannot_be_leased_and_quarantined_only_by_force(registry):
    registry.register(RID, "done", result_for("done"), "abc")
    assert not registry.lease(RID, "done", "/src/done.parquet", "w", 60)
    assert not registry.lease(RID, "done", "/src/done.parquet", "w", 60, force=True)
    registry.quarantine(RID, "bad", "input quality gate failed", [], source_uri="/src/bad.parquet")
    assert not registry.lease(RID, "bad", "/src/bad.parquet", "w", 60)
    assert registry.lease(RID, "bad", "/src/bad.parquet", "w", 60, force=True)


def test_release_and_progress_need_the_lease(registry):
    token = registry.lease(RID, "s1", "/src/s1.parquet", "a", 60)
    assert token
    assert not registry.progress(RID, "s1", "b", token=token, status="expanding")
    assert not registry.progress(RID, "s1", "a", token=token - 1, status="expanding")  # a stale token
    assert registry.progress(
        RID, "s1", "a", token=token, status="expanding", counters={"documents_done": 3, "accepted": 12}, ttl_s=120
    )
    row = registry.shard(RID, "s1")
    assert row["status"] == "expanding" and row["accepted"] == 12 and row["progress"]["documents_done"] == 3
    assert row["lease_expires_at"] > row["started_at"]
    with pytest.raises(ValueError):
        registry.progress(RID, "s1", "a", token=token, status="registered")
    assert not registry.release(RID, "s1", "b", token=token)
    assert not registry.release(RID, "s1", "a", token=token + 1)
    assert registry.release(RID, "s1", "a", token=token)
    row = registry.shard(RID, "s1")
    assert row["status"] == "planned" and row["lease_owner"] is None
    assert registry.lease(RID, "s1", "/src/s1.parquet", "b", 60)


def _lease_worker(url: str, owner: str, rounds: int, start, results) -> None:
    registry = Registry(url)
    wins = []
    for i in range(rounds):
        start.wait()
        if registry.lease(RID, f"race-{i:03d}", f"/src/race-{i:03d}.parquet", owner, ttl_s=300):
            wins.append(i)
    results.put((owner, wins))
    registry.close()


def test_two_processes_racing_for_a_lease_exactly_one_wins(registry):
    rounds = 60
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_lease_worker, args=(registry.url, owner, rounds, start, results))
        for owner in ("proc-a", "proc-b")
    ]
    for worker in workers:
        worker.start()
    wins = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(wins["proc-a"] + wins["proc-b"]) == list(range(rounds))  # one winner per round
    for i in range(rounds):
        row = registry.shard(RID, f"race-{i:03d}")
        winner = "proc-a" if i in wins["proc-a"] else "proc-b"
        assert row["lease_owner"] == winner and row["attempts"] == 1


# -- registration --------------------------------------------------------------------------


def test_register_twice_leaves_one_row_and_other_content_is_refused(registry):
    result = result_for("s1")
    token = registry.lease(RID, "s1", result.source_uri, "w", 60)
    assert token
    assert registry.register(
        RID, "s1", result, "sha-1", label_summary={"genres": [["tutorial", 4]], "audiences": []}, token=token
    )
    assert not registry.register(RID, "s1", result, "sha-1", token=token)
    assert not registry.register(RID, "s1", result, "sha-1")
    rows = registry.shards(RID)
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "registered" and row["checksum"] == "sha-1" and row["lease_owner"] is None
    assert row["accepted"] == 42 and row["rejects_by_reason"] == {"low_keyword_coverage": 5, "truncated": 3}
    assert row["expansion_ratio"] == pytest.approx(4.5) and row["registered_at"]
    with pytest.raises(RegistryConflict, match="sha-1"):
        registry.register(RID, "s1", result, "sha-2")
    assert registry.shard(RID, "s1")["checksum"] == "sha-1"
    assert [e["event"] for e in registry.events(RID, "s1")] == ["lease", "register"]


def _register_worker(url: str, rounds: int, start, results) -> None:
    registry = Registry(url)
    newly = []
    for i in range(rounds):
        start.wait()
        newly.append(registry.register(RID, f"reg-{i:03d}", result_for(f"reg-{i:03d}"), f"sum-{i}"))
    results.put(newly)
    registry.close()


def test_two_processes_registering_the_same_shard_register_it_once(registry):
    rounds = 20
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_register_worker, args=(registry.url, rounds, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    a, b = (results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert all(x != y for x, y in zip(a, b, strict=True))  # exactly one True per shard
    assert len(registry.shards(RID, status="registered")) == rounds


def test_quarantine_and_failure_never_touch_a_registered_shard(registry):
    registry.register(RID, "s1", result_for("s1"), "sha")
    with pytest.raises(RegistryConflict):
        registry.quarantine(RID, "s1", "late failure", [])
    assert not registry.mark_failed(RID, "s1", "boom")
    assert registry.shard(RID, "s1")["status"] == "registered"


def test_quarantine_keeps_the_failed_expectations(registry):
    failed = [{"suite": "output.rows", "check": "unique_ids", "column": "id", "observed": "2 of 20 rows unexpected"}]
    registry.quarantine(
        RID, "s2", "output quality gate failed: unique_ids", failed, result=result_for("s2"), checksum="x"
    )
    row = registry.shard(RID, "s2")
    assert row["status"] == "quarantined" and row["failed_expectations"] == failed
    assert row["last_error"].startswith("output quality gate failed") and row["documents"] == 10
    with pytest.raises(RegistryError, match="unknown shard"):
        registry.quarantine(RID, "never-seen", "x", [])


def test_mark_failed_frees_the_lease_for_a_retry(registry):
    assert registry.lease(RID, "s3", "/src/s3.parquet", "w1", 300)
    assert not registry.mark_failed(RID, "s3", "endpoints unavailable", owner="someone-else")
    assert registry.mark_failed(RID, "s3", "endpoints unavailable: all down", owner="w1")
    row = registry.shard(RID, "s3")
    assert row["status"] == "failed" and row["lease_owner"] is None and "all down" in row["last_error"]
    assert registry.lease(RID, "s3", "/src/s3.parquet", "w2", 300)
    assert registry.shard(RID, "s3")["attempts"] == 2


def test_quality_results_are_kept_as_history(registry):
    stats = {"evaluated_expectations": 25, "unsuccessful_expectations": 1, "figures": {"documents": 6}}
    failed = [{"check": "keyword_coverage", "observed": "12 of 24 rows unexpected"}]
    registry.record_quality(RID, "s1", "output", False, stats, failed, "/out/quality/s1/output/index.html")
    registry.record_quality(RID, "s1", "output", True, {"evaluated_expectations": 25, "unsuccessful_expectations": 0})
    results = registry.quality_results(RID, "s1")
    assert [r["success"] for r in results] == [False, True]
    assert results[0]["failed_expectations"] == failed and results[0]["statistics"]["figures"] == {"documents": 6}
    assert results[0]["evaluated"] == 25 and results[0]["failed"] == 1


# -- reading -------------------------------------------------------------------------------


def test_totals_cover_registered_shards_and_count_every_status(registry):
    registry.ensure_recipe(RECIPE)
    labels = {"genres": [["tutorial", 30], ["report", 12]], "audiences": [["students", 40]]}
    registry.register(RID, "a", result_for("a"), "x", label_summary=labels)
    registry.register(
        RID, "b", result_for("b", accepted=38, rejects_by_reason={"truncated": 2}), "y", label_summary=labels
    )
    registry.quarantine(RID, "c", "bad", [], result=result_for("c"))
    registry.plan([("/src/d.parquet", "d")], RID)
    totals = registry.totals(RID)
    assert totals["shards"] == 4 and totals["registered_shards"] == 2
    assert totals["by_status"]["registered"] == 2 and totals["by_status"]["quarantined"] == 1
    assert totals["by_status"]["planned"] == 1 and set(totals["by_status"]) == set(STATUSES)
    assert totals["documents"] == 20 and totals["accepted"] == 80 and totals["prompt_tokens"] == 24_000
    assert totals["expansion_ratio"] == pytest.approx(4.5)
    assert totals["rejects_by_reason"] == {"low_keyword_coverage": 5, "truncated": 5}
    assert totals["genres"][0] == ("tutorial", 60) and totals["audiences"] == [("students", 80)]
    assert registry.totals("r-other")["shards"] == 0
    assert registry.totals()["registered_shards"] == 2
    text = format_totals(totals)
    assert "registered=2" in text and "expansion x4.50" in text and "tutorial (60)" in text
    assert registry.recipes()[0]["registered"] == 2
    assert [row["shard"] for row in registry.shards(status="quarantined")] == ["c"]
    with pytest.raises(ValueError):
        registry.shards(status="done")


def test_the_totals_migration_sums_shards_registered_before_it_as_register_does(registry):
    """Running totals are kept by `register`; migrations 0006-0007 fill them for the
    shards registered before they existed. Drop them and apply them again: the same totals."""
    from sqlalchemy import text

    registry.ensure_recipe(RECIPE)
    registry.register(RID, "a", result_for("a", rejects_by_reason={"truncated": 2, "invalid_pairs": 1}), "x",
                      label_summary={"genres": [["tutorial", 30], ["report", 12]], "audiences": [["students", 40]]})
    registry.register(RID, "b", result_for("b", rejects_by_reason={}), "y", label_summary=None)
    registry.register(RID, "c", result_for("c", seconds=3.5), "z",
                      label_summary={"genres": [["report", 5]], "audiences": [], "rows": 5})
    registry.register("r-other", "a", result_for("a"), "w", label_summary={"genres": [["report", 7]], "audiences": []})
    registry.quarantine(RID, "q", "bad", [], result=result_for("q", rejects_by_reason={"truncated": 99}))
    kept = (registry.totals(RID), registry.totals("r-other"), registry.totals())
    assert kept[0]["rejects_by_reason"] == {"truncated": 5, "low_keyword_coverage": 5, "invalid_pairs": 1}
    assert kept[0]["genres"] == [("tutorial", 30), ("report", 17)] and kept[0]["registered_shards"] == 3
    assert kept[2]["genres"][1] == ("report", 24) and kept[2]["registered_shards"] == 4

    with registry.engine.begin() as conn:
        for statement in ("DROP TABLE registered_tallies", "DROP TABLE registered_totals",
                          "ALTER TABLE shards DROP COLUMN source_identity",  # 0009 runs again too
                          *FIDELITY_DROPS,  # and 0010
                          "DELETE FROM schema_version WHERE version >= 6"):
            conn.execute(text(statement))
    assert registry.upgrade() == [v for v, _, _ in registry.migrations() if v >= 6]
    assert (registry.totals(RID), registry.totals("r-other"), registry.totals()) == kept


# What migration 0010 adds to `shards` (`registered_totals` is dropped whole).
FIDELITY_DROPS = tuple(f"ALTER TABLE shards DROP COLUMN {name}" for name in FIDELITY_COUNTS)
RATES = ("invented_fact_rate", "label_echo_rate", "genre_kept_rate")


def test_fidelity_rates_are_stored_per_shard_and_summed_by_rows(registry):
    from maga_tasks.registry.dashboard import corpus_overview

    registry.ensure_recipe(RECIPE)
    small = {"fact_checked_rows": 2, "invented_fact_rows": 1, "echo_checked_rows": 2, "label_echo_rows": 0,
             "genre_cue_rows": 1, "genre_kept_rows": 1}
    large = {"fact_checked_rows": 98, "invented_fact_rows": 0, "echo_checked_rows": 50, "label_echo_rows": 5,
             "genre_cue_rows": 0, "genre_kept_rows": 0}
    registry.register(RID, "a", result_for("a", **small), "x")
    registry.register(RID, "b", result_for("b", **large), "y")
    registry.quarantine(RID, "q", "bad", [], result=result_for("q", fact_checked_rows=10, invented_fact_rows=10))
    a, b = registry.shard(RID, "a"), registry.shard(RID, "b")
    assert (a["invented_fact_rate"], a["label_echo_rate"], a["genre_kept_rate"]) == (0.5, 0.0, 1.0)
    assert (b["invented_fact_rate"], b["label_echo_rate"], b["genre_kept_rate"]) == (0.0, 0.1, None)
    totals = registry.totals(RID)
    # Weighted by rows (1 of 100, 5 of 52, 1 of 1), not a mean of shard rates; the
    # quarantined shard is not published and not counted.
    assert (totals["invented_fact_rate"], totals["label_echo_rate"], totals["genre_kept_rate"]) == (
        0.01, round(5 / 52, 4), 1.0)
    page = corpus_overview(registry, recipe_id=RID)
    assert {name: page["recipes"][0]["totals"][name] for name in RATES} == {name: totals[name] for name in RATES}
    rows = {row["shard"]: row for row in page["recipes"][0]["shards"]}
    assert {name: rows["b"][name] for name in RATES} == {"invented_fact_rate": 0.0, "label_echo_rate": 0.1,
                                                        "genre_kept_rate": None}
    assert rows["q"]["invented_fact_rate"] == 1.0  # a quarantined shard's own figures are shown
    assert "fidelity: invented facts 1.0%, label echo 9.6%, genre kept 100.0%" in format_totals(totals)


def test_a_registry_at_0009_with_registered_shards_upgrades_and_reads_null_rates(registry):
    """Shards registered before migration 0010 have no fidelity counts: their rates and
    the totals over them read as null, and a shard registered after counts alone."""
    from sqlalchemy import text

    from maga_tasks.registry.dashboard import corpus_overview

    registry.ensure_recipe(RECIPE)
    # A registry as 0009 left it, with its shards registered by the code of that time.
    with registry.engine.begin() as conn:
        for statement in (*FIDELITY_DROPS, *(f"ALTER TABLE registered_totals DROP COLUMN {name}"
                                             for name in FIDELITY_COUNTS),
                          "DELETE FROM schema_version WHERE version >= 10"):
            conn.execute(text(statement))
        conn.execute(text(
            "INSERT INTO shards (recipe_id, shard, source_uri, status, documents, accepted, rejected,"
            " source_chars, output_chars, checksum, registered_at, created_at, updated_at)"
            " VALUES (:rid, 'old', '/src/old.parquet', 'registered', 10, 40, 10, 100, 300, 'c',"
            " '2026-11-01T02:00:00.000000Z', '2026-11-01T02:00:00.000000Z', '2026-11-01T02:00:00.000000Z')"
        ), {"rid": RID})
        conn.execute(text(
            "INSERT INTO registered_totals (recipe_id, shards, documents, accepted, rejected, source_chars,"
            " output_chars) VALUES (:rid, 1, 10, 40, 10, 100, 300)"
        ), {"rid": RID})
    assert registry.schema_version() == 9
    assert registry.upgrade() == [10]

    old = registry.shard(RID, "old")
    assert old["fact_checked_rows"] is None and all(old[name] is None for name in RATES)
    totals = registry.totals(RID)
    assert totals["accepted"] == 40 and all(totals[name] is None for name in RATES)
    page = corpus_overview(registry, recipe_id=RID)
    assert all(page["recipes"][0]["shards"][0][name] is None for name in RATES)
    assert "fidelity:" not in format_totals(totals)

    registry.register(RID, "new", result_for("new", fact_checked_rows=4, invented_fact_rows=1), "n")
    totals = registry.totals(RID)
    assert totals["accepted"] == 82 and totals["invented_fact_rate"] == 0.25 and totals["label_echo_rate"] is None


def test_status_lists_a_bounded_page_and_totals_cover_every_shard(registry, registry_url, capsys):
    from maga_tasks.cli import main as maga
    from maga_tasks.registry.dashboard import corpus_overview
    from maga_tasks.registry.reads import format_status

    registry.ensure_recipe(RECIPE)
    registry.record_planned(RID, [(f"/src/p{i:02d}.parquet", f"p{i:02d}") for i in range(30)])
    for i in range(8):
        assert registry.mark_failed(RID, f"p{i:02d}", f"down {i}", max_failures=0) == "failed"
    for i in range(8, 12):
        registry.quarantine(RID, f"p{i:02d}", "bad", [])
    for i in range(12, 15):
        registry.register(RID, f"p{i:02d}", result_for(f"p{i:02d}"), "x")

    status = registry.status(RID, limit=5)
    assert status["shards"] == 30 and status["registered_shards"] == 3 and status["documents"] == 30
    assert status["by_status"]["failed"] == 8 and status["by_status"]["quarantined"] == 4
    assert len(status["attention"]) == 5 and status["attention_not_shown"] == 7
    assert {row["status"] for row in status["attention"]} <= {"failed", "quarantined"}
    stamps = [row["updated_at"] for row in status["attention"]]
    assert stamps == sorted(stamps, reverse=True)
    assert "7 more not shown" in format_status(status)

    # The CLI: totals for all shards, the listing bounded by --limit.
    assert maga(["status", "--registry", registry_url, "--recipe-id", RID, "--limit", "3"]) == 0
    err = capsys.readouterr().err
    assert "30 shards" in err and "9 more not shown" in err
    assert err.count("  failed  ") + err.count("  quarantined  ") == 3

    # The dashboard page: the newest `shard_limit`, plus as many waiting ones, the rest counted.
    page = corpus_overview(registry, recipe_id=RID, shard_limit=4)["recipes"][0]
    assert 4 < len(page["shards"]) <= 8 and page["shards_not_shown"] == 30 - len(page["shards"])
    assert sum(row["status"] in ("failed", "quarantined") for row in page["shards"]) >= 4
