"""The partitioned asset per registered shard, under the real scheduler stack: a nightly
run registering N shards (and quarantining one) gives exactly N runs of the example
consumer DAG `maga_shard_token_count`, one per partition key = shard name, each
successful, whose token counts are the registry's; clearing the run's shard tasks (they
re-run as no-ops) announces nothing more.

The stack is the session's: the other stack tests' runs announce their shards on the same
asset (named `part-NNNN`), and the consumer, once unpaused, runs for those too. This test's
shards have names of their own, and it counts only the events, partitions and consumer
runs of those names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from maga_tasks.engine.assets import SHARDS_ASSET_URI

# `stack_operator` is a fixture of the stack tests (the recipes folder and the endpoints).
from tests.e2e.test_airflow_e2e import registered, run_conf, stack_operator, write_recipe  # noqa: F401
from tests.support.airflow import DAG_ID, failure_report, task_instances, wait_for, wait_for_runs_finished
from tests.support.shards import write_source_shard

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(600)]

CONSUMER = "maga_shard_token_count"


# This test's shard names: no other test names a shard so.
SHARDS = [f"asset-{i:04d}" for i in range(4)]


def consumer_runs(af) -> list[tuple]:
    """(run_id, partition_key, state) of the consumer's runs for this test's shards."""
    found = af.query(
        "SELECT run_id, partition_key, state FROM dag_run WHERE dag_id = %(d)s ORDER BY id", {"d": CONSUMER}
    )
    return [run for run in found if run[1] in SHARDS]


def shard_events(af) -> list[tuple]:
    """(partition_key, extra, source_run_id, source_map_index) of the events on the shards
    asset for this test's shards."""
    found = af.query(
        "SELECT e.partition_key, e.extra, e.source_run_id, e.source_map_index FROM asset_event e"
        " JOIN asset a ON a.id = e.asset_id WHERE a.uri = %(u)s ORDER BY e.id",
        {"u": SHARDS_ASSET_URI},
    )
    return [event for event in found if event[0] in SHARDS or event[2] == "partition-asset-test"]


def queued_partitions(af) -> list[tuple]:
    """(partition_key, created_dag_run_id) of the consumer's partition runs for this test's
    shards: Airflow adds one with the event that asks for it, in the same transaction."""
    found = af.query(
        "SELECT partition_key, created_dag_run_id FROM asset_partition_dag_run WHERE target_dag_id = %(d)s",
        {"d": CONSUMER},
    )
    return [row for row in found if row[0] in SHARDS]


def clear_shard_tasks(af, run_id: str) -> None:
    """Clear every publish_shard task of a finished run (as a person does in the UI)."""
    from tests.support.airflow import http_json

    status, body = http_json(
        f"{af.api_url}/api/v2/dags/{DAG_ID}/clearTaskInstances", method="POST", token=af.token(),
        body={"dry_run": False, "dag_run_id": run_id, "task_ids": ["publish_shard"], "only_failed": False,
              "reset_dag_runs": True},
    )
    assert status == 200 and len(body["task_instances"]) == 4, (status, body)


def test_each_registered_shard_runs_the_consumer_once(
    airflow_stack, af_llm_server_factory, tmp_path, stack_operator  # noqa: F811
):
    from maga_tasks.data.sample_corpus import write_sample_corpus

    af = airflow_stack
    started = time.monotonic()
    source = tmp_path / "corpus"
    for index, path in enumerate(sorted(write_sample_corpus(source, shards=3, docs_per_shard=2, offset=800))):
        path.rename(source / f"{SHARDS[index]}.parquet")
    # A fourth shard fails the input gate (a repeated id): quarantined, not announced.
    write_source_shard(source / f"{SHARDS[3]}.parquet", [{"id": "a", "text": "Deltas."}, {"id": "a", "text": "Again."}])
    output_root = str(tmp_path / "expanded")
    recipe_path, recipe_id = write_recipe(tmp_path, "partition-asset-test")
    llm = af_llm_server_factory()
    conf = run_conf(str(source), output_root, llm.url, recipe_path, shards_per_run=4)
    stack_operator(recipe_path, llm.url)
    assert consumer_runs(af) == [] and shard_events(af) == []
    # Paused at creation like every DAG of the stack: from now on the scheduler queues it.
    wait_for(lambda: af.cli("dags", "unpause", CONSUMER, check=False).returncode == 0, 60, 2.0, "the consumer DAG")
    try:
        af.cli("dags", "trigger", DAG_ID, "-r", "partition-asset-test", "-c", json.dumps(conf))
        runs = wait_for_runs_finished(af, {"partition-asset-test"}, timeout=300)
        assert [r[2] for r in runs] == ["success"], failure_report(af, runs)
        shards = registered(af.registry_url, recipe_id)
        assert sorted(shards) == SHARDS[:3]
        phases = {"nightly run": time.monotonic() - started}

        # One event per registered shard, its name the partition key: none for the
        # quarantined shard, none without a partition key.
        events = shard_events(af)
        assert sorted(e[0] for e in events) == sorted(shards), events
        for key, extra, run_id, _ in events:
            row = shards[key]
            assert run_id == "partition-asset-test" and extra["recipe_id"] == recipe_id and extra["shard"] == key
            assert (extra["checksum"], extra["data_uri"], extra["accepted"]) == (
                row["checksum"], row["data_uri"], row["accepted"])
            assert extra["corpus_uri"] == f"{output_root}/{recipe_id}"

        # ...and one consumer run per shard, each successful, whose count is the registry's.
        def consumers_done():
            found = consumer_runs(af)
            return found if len(found) >= len(shards) and all(r[2] in ("success", "failed") for r in found) else False

        consumed = wait_for(consumers_done, 180, 2.0, "a consumer run per registered shard")
        assert sorted(r[1] for r in consumed) == sorted(shards), consumed
        assert all(r[2] == "success" for r in consumed), consumed
        for name, row in shards.items():
            count = json.loads((Path(output_root) / "_token_counts" / recipe_id / f"{name}.json").read_text())
            assert count["completion_tokens"] == row["completion_tokens"] > 0, (name, count, row)
            assert (count["rows"], count["checksum"]) == (row["accepted"], row["checksum"]), name
        phases["consumer runs"] = time.monotonic() - started - sum(phases.values())

        # Clear the run's shard tasks: each re-runs, finds its shard registered by an
        # earlier try of itself and the event of that try in Airflow, and announces nothing.
        clear_shard_tasks(af, "partition-asset-test")
        again = wait_for_runs_finished(af, {"partition-asset-test"}, timeout=300)
        assert [r[2] for r in again] == ["success"], failure_report(af, again)
        publish = [ti for ti in task_instances(af, "partition-asset-test") if ti[0] == "publish_shard"]
        assert all(ti[3] == "success" and ti[4] == 2 for ti in publish), publish
        # Events and partition runs are written with the task's success: once the run is
        # done, nothing more can come of it.
        assert len(shard_events(af)) == len(shards)
        assert sorted(key for key, _ in queued_partitions(af)) == sorted(shards)
        assert af.query("SELECT count(*) FROM log WHERE event = 'missing partition key'") == [(0,)]
        assert len(consumer_runs(af)) == len(shards)
        phases["cleared shard tasks"] = time.monotonic() - started - sum(phases.values())
    finally:
        af.cli("dags", "pause", CONSUMER)
    print("partitioned asset e2e: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items()))
