"""publish_shard on SQLite and PostgreSQL: register once, heal a crash between commit and
register, quarantine defective shards (listed in the registry and in Data Docs), stay
quarantined unless forced, fail loudly when every endpoint is down."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.publish import (
    check_committed_shard,
    publish_shard,
    register_committed_shard,
)
from maga_tasks.errors import EndpointsUnavailable
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import Registry, RegistryConflict, ShardBusy
from maga_tasks.settings import RunSettings
from tests.support.shards import committed_source, write_committed_shard, write_source_shard

RECIPE = load_recipe()
RID = RECIPE.recipe_id
PAIRS = RECIPE.pairs_per_document
# Nothing listens here: a test using it proves that no LLM request was needed.
DEAD = RunSettings(endpoints=("http://127.0.0.1:9",), all_down_timeout_s=0.5, max_attempts=1, backoff_base_s=0)


def live(url: str) -> RunSettings:
    return RunSettings(endpoints=(url,), max_concurrency=16, backoff_base_s=0.05, progress_interval_s=0.2)


def docs_text(docs_uri: str) -> str:
    site = Path(docs_uri).parent
    return "\n".join(p.read_text(encoding="utf-8") for p in site.rglob("*.html"))


# -- committed files (no LLM needed) ------------------------------------------------------------


def test_a_good_committed_shard_is_registered_once(tmp_path, registry):
    source, out = committed_source(tmp_path)
    first = publish_shard(source, out, RECIPE, DEAD, registry, owner="w1")
    assert first["status"] == "registered" and first["quality_success"] and first["newly_registered"]
    assert first["documents"] == 6 and first["accepted"] == 24 and first["already_committed"]
    row = registry.shard(RID, "part-0000")
    assert row["status"] == "registered" and row["checksum"] == first["checksum"]
    assert row["label_summary"]["genres"] and row["docs_uri"] == first["docs_uri"]
    assert row["lease_owner"] is None and row["attempts"] == 1

    again = publish_shard(source, out, RECIPE, DEAD, registry, owner="w2")
    assert again["status"] == "registered" and again["skipped"] and again["checksum"] == first["checksum"]
    assert len(registry.shards(RID)) == 1
    assert len(registry.quality_results(RID, "part-0000")) == 1  # the second call did no work
    assert registry.totals(RID)["accepted"] == 24


def test_a_crash_between_commit_and_register_is_healed(tmp_path, registry):
    source, out = committed_source(tmp_path)  # the files a crashed worker committed
    token = registry.lease(RID, "part-0000", source, "crashed-worker", ttl_s=1.0)
    assert token
    assert registry.progress(RID, "part-0000", "crashed-worker", token=token, status="committed")

    with pytest.raises(ShardBusy, match="crashed-worker"):  # its lease is still live
        publish_shard(source, out, RECIPE, DEAD, registry, owner="w2")
    time.sleep(1.2)
    healed = publish_shard(source, out, RECIPE, DEAD, registry, owner="w2")

    assert healed["status"] == "registered" and healed["already_committed"]
    row = registry.shard(RID, "part-0000")
    assert row["status"] == "registered" and row["attempts"] == 2
    assert [e["event"] for e in registry.events(RID, "part-0000")] == ["lease", "takeover", "register"]


@pytest.mark.parametrize(
    ("defect", "check"),
    [
        ("duplicate_ids", "unique_ids"),
        ("empty_texts", "text_length"),
        ("low_coverage", "keyword_coverage"),
        ("low_yield", "accepted_per_document"),
    ],
)
def test_a_defective_shard_is_quarantined_with_its_failed_expectations(tmp_path, registry, defect, check):
    source, out = committed_source(tmp_path, defects=(defect,))
    summary = publish_shard(source, out, RECIPE, DEAD, registry, owner="w1")

    assert summary["status"] == "quarantined" and not summary["quality_success"]
    assert any(name.startswith(check) for name in summary["failed_expectations"])
    row = registry.shard(RID, "part-0000")
    assert row["status"] == "quarantined" and row["registered_at"] is None and row["lease_owner"] is None
    assert check in {item["check"] for item in row["failed_expectations"]}
    assert check in row["last_error"]
    results = registry.quality_results(RID, "part-0000")
    assert [(r["suite"], r["success"]) for r in results] == [("output", False)]
    assert check in {item["check"] for item in results[0]["failed_expectations"]}
    assert f"{check}:" in docs_text(row["docs_uri"])
    assert registry.totals(RID)["registered_shards"] == 0


def test_quarantine_holds_until_forced(tmp_path, registry):
    source, out = committed_source(tmp_path, defects=("duplicate_ids",))
    assert publish_shard(source, out, RECIPE, DEAD, registry, owner="w1")["status"] == "quarantined"

    held = publish_shard(source, out, RECIPE, DEAD, registry, owner="w1")
    assert held["status"] == "quarantined" and held["skipped"]
    assert len(registry.quality_results(RID, "part-0000")) == 1  # not even validated again

    forced = publish_shard(source, out, RECIPE, DEAD, registry, owner="w1", force=True)
    assert forced["status"] == "quarantined"
    assert len(registry.quality_results(RID, "part-0000")) == 2

    write_committed_shard(out, RECIPE, "part-0000")  # someone repaired the output
    fixed = publish_shard(source, out, RECIPE, DEAD, registry, owner="w1", force=True)
    assert fixed["status"] == "registered"
    assert registry.shard(RID, "part-0000")["failed_expectations"] is None


def test_register_committed_shard_is_idempotent_and_refuses_other_content(tmp_path, registry):
    source, out = committed_source(tmp_path)
    first = register_committed_shard(source, out, RECIPE, registry)
    second = register_committed_shard(source, out, RECIPE, registry)
    assert first["newly_registered"] and not second["newly_registered"]
    assert first["checksum"] == second["checksum"] and len(registry.shards(RID)) == 1

    write_committed_shard(out, RECIPE, "part-0000", accepted_per_document=3)  # different bytes
    with pytest.raises(RegistryConflict):
        register_committed_shard(source, out, RECIPE, registry)
    assert registry.shard(RID, "part-0000")["checksum"] == first["checksum"]


def test_check_committed_shard_records_without_changing_status(tmp_path, registry):
    source, out = committed_source(tmp_path, defects=("low_coverage",))
    report = check_committed_shard(source, out, RECIPE, registry=registry)
    assert not report.success and "keyword_coverage" in report.reason()
    assert registry.shard(RID, "part-0000") is None  # validation alone decides nothing
    assert registry.quality_results(RID, "part-0000")[0]["success"] is False


# -- before the expansion ---------------------------------------------------------------------


def test_input_defects_quarantine_before_any_llm_request(tmp_path, registry):
    rows = [{"id": "a", "text": "A document about deltas."}, {"id": "a", "text": "Same id again."}]
    source = write_source_shard(tmp_path / "source" / "part-0007.parquet", rows)
    summary = publish_shard(source, str(tmp_path / "out"), RECIPE, DEAD, registry, owner="w1")
    assert summary["status"] == "quarantined"
    assert summary["failed_expectations"][0].startswith("source_id_unique")
    assert registry.shard(RID, "part-0007")["status"] == "quarantined"
    assert registry.quality_results(RID, "part-0007")[0]["suite"] == "input"
    assert not Path(shard_paths(str(tmp_path / "out"), RID, "part-0007").data).exists()


def test_an_unreadable_source_is_quarantined(tmp_path, registry):
    broken = tmp_path / "source" / "part-0008.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not parquet at all")
    summary = publish_shard(str(broken), str(tmp_path / "out"), RECIPE, DEAD, registry, owner="w1")
    assert summary["status"] == "quarantined" and "unusable source shard" in summary["reason"]


def test_all_endpoints_down_marks_failed_and_reraises(tmp_path, registry):
    source = write_source_shard(
        tmp_path / "source" / "part-0009.parquet",
        [{"id": f"d{i}", "text": f"Document {i} about river deltas and their sediment."} for i in range(3)],
    )
    with pytest.raises(EndpointsUnavailable):
        publish_shard(
            source, str(tmp_path / "out"), RECIPE, DEAD.model_copy(update={"max_shard_failures": 1}), registry,
            owner="w1",
        )
    row = registry.shard(RID, "part-0009")
    # The fleet's failure, not the shard's: recorded, never final (not `failed` for good).
    assert row["status"] == "planned" and row["lease_owner"] is None and row["attempts"] == 1
    assert row["last_error"].startswith("endpoints unavailable")
    # The retry may take the shard at once.
    assert registry.lease(RID, "part-0009", source, "retry", 60)


# -- end to end with the test LLM server --------------------------------------------------------


@pytest.mark.integration
def test_publish_expands_validates_and_registers_then_costs_nothing(tmp_path, registry, llm_server):
    source = str(write_sample_corpus(tmp_path / "source", 1, 12)[0])
    out = str(tmp_path / "out")
    beats = []
    summary = publish_shard(source, out, RECIPE, live(llm_server.url), registry, owner="w1", progress=beats.append)
    assert summary["status"] == "registered", summary
    assert summary["documents"] == 12 and not summary["already_committed"]
    requests = llm_server.stats()["requests_total"]
    assert requests > 0 and beats
    suites = [r["suite"] for r in registry.quality_results(RID, "part-0000")]
    assert suites == ["input", "output"]
    row = registry.shard(RID, "part-0000")
    assert row["prompt_tokens"] == summary["prompt_tokens"] > 0 and row["progress"]["documents"] == 12

    again = publish_shard(source, out, RECIPE, live(llm_server.url), registry, owner="w2")
    assert again["status"] == "registered" and llm_server.stats()["requests_total"] == requests


@pytest.mark.integration
def test_a_repeated_id_counts_once_against_the_input_gate(tmp_path, registry, llm_server):
    """41 rows, one of them repeating an earlier id: the expansion keeps the first row and
    rejects the later one (duplicate_id), so the input gate counts one unusable row in
    41 (2.4%), not the two GX's uniqueness check flags (4.9%). With 97% required valid
    rows the shard is registered and the repeat is in rejected/ with its reason."""
    import pyarrow.parquet as pq

    rows = pq.read_table(write_sample_corpus(tmp_path / "sample", 1, 40)[0]).to_pylist()
    rows.append({**rows[7], "text": "Another text that arrived under an id already used in this shard."})
    source = write_source_shard(tmp_path / "source" / "part-0000.parquet", rows)
    out = str(tmp_path / "out")
    recipe = RECIPE.model_copy(update={"quality": RECIPE.quality.model_copy(update={"min_valid_source_share": 0.97})})
    summary = publish_shard(source, out, recipe, live(llm_server.url), registry, owner="w1")
    assert summary["status"] == "registered", summary
    rejected = pq.read_table(shard_paths(out, recipe.recipe_id, "part-0000").rejected).to_pylist()
    repeats = [r for r in rejected if r["reject_reason"] == "duplicate_id"]
    # The later row's pair slots, each rejected with the reason; the first row was expanded.
    assert sorted((r["source_id"], r["pair_index"]) for r in repeats) == [(rows[7]["id"], i) for i in range(PAIRS)]
    accepted = pq.read_table(shard_paths(out, recipe.recipe_id, "part-0000").data).to_pylist()
    assert rows[7]["id"] in {r["source_id"] for r in accepted}


@pytest.mark.integration
def test_a_trial_run_registers_nothing_and_leaves_the_full_shard_to_publish(tmp_path, registry, llm_server):
    source = str(write_sample_corpus(tmp_path / "source", 1, 12)[0])
    out = str(tmp_path / "out")
    trial = publish_shard(source, out, RECIPE, live(llm_server.url), registry, owner="w1", max_docs=4)
    assert trial["status"] == "trial" and trial["quality_success"], trial
    assert trial["documents"] == 4 and trial["accepted"] + trial["rejected"] == 4 * RECIPE.pairs_per_document
    assert "/_trials/first-4/" in trial["data_uri"] and Path(trial["data_uri"]).exists()
    assert registry.shard(RID, "part-0000") is None and registry.totals(RID)["documents"] == 0
    trial_requests = llm_server.stats()["requests_total"]

    full = publish_shard(source, out, RECIPE, live(llm_server.url), registry, owner="w1")
    assert full["status"] == "registered" and full["documents"] == 12 and not full["already_committed"]
    assert full["data_uri"] == shard_paths(out, RID, "part-0000").data
    assert llm_server.stats()["requests_total"] > trial_requests
    assert registry.totals(RID)["documents"] == 12


@pytest.mark.integration
def test_judge_measures_a_newly_registered_shard_once(tmp_path, registry, llm_server):
    import json

    source = str(write_sample_corpus(tmp_path / "source", 1, 10)[0])
    out = str(tmp_path / "out")
    summary = publish_shard(source, out, RECIPE, live(llm_server.url), registry, owner="w1", judge_sample=8)
    assert summary["status"] == "registered" and summary["judge_scored"] == 8, summary
    # The test server scores by the source keywords a rewrite keeps; accepted rewrites keep many.
    assert summary["judge_pass_share"] == 1.0
    assert llm_server.stats()["by_stage"]["judge"] == 8
    # Every sample answered the genre question (its share: tests/integration/test_judging.py).
    assert 0.0 <= summary["judge_genre_kept_share"] <= 1.0

    (judged,) = [r for r in registry.quality_results(RID, "part-0000") if r["suite"] == "judge"]
    assert judged["success"] and judged["evaluated"] == 8 and judged["statistics"]["pass_share"] == 1.0
    document = json.loads(Path(summary["judge_uri"]).read_text())
    assert len(document["samples"]) == 8
    samples = document["samples"]
    assert all(3 <= s["score"] <= 5 and s["analysis"] and isinstance(s["genre_kept"], bool) for s in samples)
    assert document["prompt_tokens"] > 0 and sum(document["scores"].values()) == 8
    assert registry.shard(RID, "part-0000")["prompt_tokens"] == summary["prompt_tokens"]  # judge tokens kept apart

    requests = llm_server.stats()["requests_total"]
    again = publish_shard(source, out, RECIPE, live(llm_server.url), registry, owner="w1", judge_sample=8)
    assert again["skipped"] and llm_server.stats()["requests_total"] == requests


@pytest.mark.integration
def test_a_judge_that_cannot_score_is_recorded_not_raised(tmp_path, registry, llm_server_factory):
    source = str(write_sample_corpus(tmp_path / "source", 1, 6)[0])
    out = str(tmp_path / "out")
    server = llm_server_factory("bad_json:1:stage=judge")
    summary = publish_shard(source, out, RECIPE, live(server.url), registry, owner="w1", judge_sample=4)
    assert summary["status"] == "registered" and summary["judge_scored"] == 0
    assert summary["judge_pass_share"] is None
    (judged,) = [r for r in registry.quality_results(RID, "part-0000") if r["suite"] == "judge"]
    assert not judged["success"] and judged["statistics"]["failures"] == {"judge_invalid_answer": 4}
    assert registry.shard(RID, "part-0000")["status"] == "registered"  # a measurement, not a gate


@pytest.mark.integration
def test_repeated_ids_and_eos_finishes_pass_both_gates_and_account_for_every_row(
    tmp_path, registry, llm_server_factory
):
    from collections import Counter

    import pyarrow.parquet as pq

    # 400 documents, then two later rows that repeat an id (one with another text): within
    # the input gate's share, so the output gate must pass what the input gate let through.
    rows = pq.read_table(write_sample_corpus(tmp_path / "gen", 1, 402)[0]).to_pylist()
    documents, spare = rows[:400], rows[400:]
    repeats = [documents[7], spare[0] | {"id": documents[250]["id"]}]
    source = write_source_shard(
        tmp_path / "source" / "part-0000.parquet", documents[:300] + repeats[:1] + documents[300:] + repeats[1:]
    )
    server = llm_server_factory("eos:0.5")  # half the rewrites end with "eos", not "stop"

    summary = publish_shard(source, str(tmp_path / "out"), RECIPE, live(server.url), registry, owner="w1")

    assert summary["status"] == "registered" and summary["quality_success"], summary
    assert summary["documents"] == 400 and registry.shard(RID, "part-0000")["documents"] == 400
    data = pq.read_table(summary["data_uri"]).to_pylist()
    rejected = pq.read_table(summary["rejected_uri"]).to_pylist()
    assert len(data) + len(rejected) == 402 * PAIRS  # every source row accounted for
    ids = [r["id"] for r in data + rejected]
    assert len(ids) == len(set(ids))
    duplicates = [r for r in rejected if r["reject_reason"] == "duplicate_id"]
    assert sorted({r["source_id"] for r in duplicates}) == sorted(r["id"] for r in repeats)
    assert len(duplicates) == 2 * PAIRS and not any(r["prompt_tokens"] or r["pairs_prompt_tokens"] for r in duplicates)
    kept = Counter(r["source_id"] for r in data + rejected if r.get("reject_reason") != "duplicate_id")
    assert kept == Counter({d["id"]: PAIRS for d in documents})  # one row per pair for every document
    assert {r["finish_reason"] for r in data} == {"stop", "eos"}
    assert not any(r["reject_reason"] == "unexpected_finish_reason" for r in rejected)
    assert len(server.stats()["by_doc"]) == 400  # a repeated row costs no request


def _commit_then_crash(url: str, source: str, out: str, endpoint: str) -> None:
    from maga_tasks.engine.shard import expand_shard

    registry = Registry(url)
    registry.lease(RID, "part-0000", source, "doomed-worker", ttl_s=1.0)
    expand_shard(source, out, RECIPE, live(endpoint))
    os._exit(3)  # dies after the commit, before any registration


@pytest.mark.integration
def test_a_worker_killed_after_commit_is_healed_without_llm_requests(tmp_path, registry, llm_server):
    source = str(write_sample_corpus(tmp_path / "source", 1, 8)[0])
    out = str(tmp_path / "out")
    worker = multiprocessing.get_context("spawn").Process(
        target=_commit_then_crash, args=(registry.url, source, out, llm_server.url)
    )
    worker.start()
    worker.join(timeout=300)
    assert worker.exitcode == 3
    assert registry.shard(RID, "part-0000")["status"] == "leased"
    requests = llm_server.stats()["requests_total"]
    time.sleep(1.1)  # the dead worker's lease runs out

    summary = publish_shard(source, out, RECIPE, live(llm_server.url), registry, owner="w2")
    assert summary["status"] == "registered" and summary["already_committed"]
    assert llm_server.stats()["requests_total"] == requests
    assert registry.shard(RID, "part-0000")["attempts"] == 2


@pytest.mark.integration
def test_a_source_on_s3_is_downloaded_once_per_task(s3_env):
    import boto3

    from maga_tasks.data.storage import read_once, storage_for

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="src")
    uri = "s3://src/part-0000.parquet"
    s3.put_object(Bucket="src", Key="part-0000.parquet", Body=b"first")
    storage = storage_for(uri)
    with read_once(uri):
        with storage.local_copy(uri) as first:
            pass
        s3.put_object(Bucket="src", Key="part-0000.parquet", Body=b"second")  # a new download would see it
        with storage.local_copy(uri) as again:
            assert again == first and again.read_bytes() == b"first"
    assert not first.exists()  # deleted when the task's block ends
    with storage.local_copy(uri) as fresh:
        assert fresh.read_bytes() == b"second"
