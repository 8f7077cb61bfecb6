"""The nightly DAG run by Airflow itself against the test LLM server.

- `airflow dags test` over sample shards: every shard expanded, validated, registered;
  a second run sends no LLM request and registers nothing new.
- `airflow dags test` of a dated partition of 20 files (budget 8) and one that fails
  every try: all 20 registered in the run, the failing one failed for good, named by
  summarize, whose asset event carries the release manifest of the others; the run fails.
- A real scheduler + dag-processor + api-server (LocalExecutor, metadata DB on
  PostgreSQL): `airflow backfill create` over 3 dates of a date-partitioned source
  processes exactly those partitions, and the same backfill again changes nothing.
- A shard task SIGKILLed mid-run is retried by Airflow and resumes from its checkpoint.
- A partition larger than the scheduler's max_map_length continues in runs the DAG
  triggers itself until every shard is registered.
- A flat budget larger than max_map_length is published through continuation runs: every
  shard of the budget, and no more.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from maga_tasks.engine.shard import documents_in_flight
from tests.support.airflow import (
    DAG_ID,
    PROGRESS_LINE,
    STACK_MAX_MAP_LENGTH,
    dag_runs,
    failure_report,
    read_task_log_text,
    task_instances,
    wait_for,
)
from tests.support.shards import write_source_shard

pytestmark = [pytest.mark.airflow, pytest.mark.integration, pytest.mark.timeout(900)]


def write_recipe(tmp_path: Path, name: str, **fields) -> tuple[str, str]:
    """A copy of the default recipe under another name (and `fields`): its own corpus version."""
    from maga_tasks.recipe import load_recipe, recipe_from_dict

    recipe = recipe_from_dict({**load_recipe().model_dump(mode="json"), "name": name, **fields})
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe.to_yaml(), encoding="utf-8")
    return str(path), recipe.recipe_id


def run_conf(source: str, output_root: str, llm_url: str, recipe_path: str, **extra) -> dict:
    """A run's conf: it names its recipe (in the operator's recipes folder) and chooses its
    endpoint among the configured ones (`operator_env`, `stack_operator`)."""
    conf = {
        "source": source,
        "output_root": output_root,
        "recipe": Path(recipe_path).stem,
        "endpoints": [llm_url],
        "planning_mode": "flat",
        "shards_per_run": 10,
        "max_concurrency": 8,
        "progress_interval_s": 0.2,
    }
    conf.update(extra)
    return conf


def operator_env(recipe_path: str, *llm_urls: str) -> dict:
    """What the operator configures for an `airflow dags test` run: the recipes folder
    and the endpoints a conf may choose from."""
    return {"MAGA_RECIPES_DIR": str(Path(recipe_path).parent), "MAGA_ENDPOINTS": ",".join(llm_urls)}


@pytest.fixture
def stack_operator(airflow_stack):
    """The same for the running stack, whose workers' environment is fixed: the Variable
    `maga_recipes_dir` and the endpoints of the connection `maga_llm`, removed afterwards."""
    af = airflow_stack

    def configure(recipe_path: str, *llm_urls: str) -> None:
        af.cli("variables", "set", "maga_recipes_dir", str(Path(recipe_path).parent))
        af.cli("connections", "delete", "maga_llm", check=False)
        if llm_urls:
            af.cli("connections", "add", "maga_llm", "--conn-type", "generic",
                   "--conn-extra", json.dumps({"endpoints": list(llm_urls)}))

    yield configure
    af.cli("connections", "delete", "maga_llm", check=False)
    af.cli("variables", "delete", "maga_recipes_dir", check=False)


def task_xcom(af, run_id: str, task_id: str):
    """The return value of a (non-mapped) task of a run."""
    (value,), = af.query(
        "SELECT value FROM xcom WHERE dag_id = %(d)s AND run_id = %(r)s AND task_id = %(t)s AND key = 'return_value'",
        {"d": DAG_ID, "r": run_id, "t": task_id},
    )
    return json.loads(value) if isinstance(value, str) else value


def registered(registry_url: str, recipe_id: str) -> dict[str, dict]:
    from maga_tasks.registry import Registry

    return {row["shard"]: row for row in Registry(registry_url).shards(recipe_id) if row["status"] == "registered"}


def assert_output_clean(output_root: str, recipe_id: str, shards: dict[str, dict]) -> None:
    """Every registered shard has its data file with unique row ids, as many as accepted."""
    for name, row in shards.items():
        table = pq.read_table(Path(output_root) / recipe_id / "data" / f"{name}.parquet")
        ids = table.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == row["accepted"], name
        keys = list(zip(table.column("source_id").to_pylist(), table.column("pair_index").to_pylist(), strict=True))
        assert len(keys) == len(set(keys)), name


# -- airflow dags test ------------------------------------------------------------------


def test_dags_test_publishes_every_shard_then_reruns_as_noop(
    dags_test_env, af_llm_server_factory, postgres_registry_url, tmp_path
):
    from maga_tasks.data.sample_corpus import write_sample_corpus

    source = tmp_path / "corpus"
    write_sample_corpus(source, shards=3, docs_per_shard=5)
    output_root = str(tmp_path / "expanded")
    recipe_path, recipe_id = write_recipe(tmp_path, "dags-test")
    llm = af_llm_server_factory(latency_ms=40)
    conf = run_conf(str(source), output_root, llm.url, recipe_path)
    registry_env = {"AIRFLOW_CONN_MAGA_REGISTRY": postgres_registry_url, **operator_env(recipe_path, llm.url)}
    corpus_events_sql = "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = %(u)s"

    # A trial run first: gated outputs apart from the corpus, nothing registered, no asset event.
    trial_conf = {**conf, "max_docs_per_shard": 2}
    trial = dags_test_env.cli(
        "dags", "test", DAG_ID, "2024-12-31", "-c", json.dumps(trial_conf), extra_env=registry_env, timeout=400
    )
    assert "state=success" in trial.stdout + trial.stderr, (trial.stdout + trial.stderr)[-5000:]
    assert registered(postgres_registry_url, recipe_id) == {}
    trial_files = sorted(p.name for p in (Path(output_root) / "_trials" / "first-2" / recipe_id / "data").iterdir())
    assert trial_files == ["part-0000.parquet", "part-0001.parquet", "part-0002.parquet"]
    assert not (Path(output_root) / recipe_id).exists()
    assert dags_test_env.query(corpus_events_sql, {"u": f"maga://corpus/{recipe_id}"}) == []

    started = time.monotonic()
    first = dags_test_env.cli(
        "dags", "test", DAG_ID, "2025-01-01", "-c", json.dumps(conf), extra_env=registry_env, timeout=400
    )
    first_seconds = time.monotonic() - started
    output = first.stdout + first.stderr
    assert "state=success" in output, output[-5000:]

    shards = registered(postgres_registry_url, recipe_id)
    assert set(shards) == {"part-0000", "part-0001", "part-0002"}
    assert all(row["documents"] == 5 and row["accepted"] > 0 for row in shards.values())
    assert_output_clean(output_root, recipe_id, shards)
    # Progress lines of the library reach the task log (here: the CLI's output).
    assert any(PROGRESS_LINE.search(line) and "maga_tasks" in line for line in output.splitlines()), output[-5000:]

    # One mapped task per shard, named after its shard.
    (run_id, *_), = [r for r in dag_runs(dags_test_env) if str(r[1]).startswith("2025-01-01")]
    publish = [ti for ti in task_instances(dags_test_env, run_id) if ti[0] == "publish_shard"]
    assert sorted(ti[2] for ti in publish) == sorted(shards)
    assert all(ti[3] == "success" for ti in publish)
    # The summary's asset event carries the recipe's totals.
    events = dags_test_env.query(corpus_events_sql, {"u": f"maga://corpus/{recipe_id}"})
    assert events and events[-1][0]["totals"]["registered_shards"] == 3

    requests_after_first = llm.stats()["requests_total"]
    assert requests_after_first > 0
    second = dags_test_env.cli(
        "dags", "test", DAG_ID, "2025-01-02", "-c", json.dumps(conf), extra_env=registry_env, timeout=400
    )
    assert "state=success" in second.stdout + second.stderr
    assert llm.stats()["requests_total"] == requests_after_first, "the second run sent LLM requests"
    again = registered(postgres_registry_url, recipe_id)
    assert {k: v["registered_at"] for k, v in again.items()} == {k: v["registered_at"] for k, v in shards.items()}
    print(f"dags test: first run {first_seconds:.1f}s for 3 shards")


def test_dags_test_publishes_a_whole_partition_and_names_the_shard_that_failed(
    dags_test_env, af_llm_server_factory, postgres_registry_url, tmp_path
):
    from maga_tasks.data.sample_corpus import write_sample_corpus
    from maga_tasks.registry import Registry

    ds, good, budget = "2025-02-01", 10, 4  # a partition more than twice the flat budget
    drops = tmp_path / "drops"
    write_sample_corpus(drops, shards=good, docs_per_shard=1, partitions=[ds])
    # One more file: a document over the context budget, and the tokenizer needed to cut
    # it cannot be loaded. Every try of that shard fails.
    poisoned_shard = f"{ds}_part-{good:04d}"
    write_source_shard(drops / ds / f"part-{good:04d}.parquet", [{"id": "huge", "text": "River deltas form. " * 400}])
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("not a tokenizer")
    recipe_path, recipe_id = write_recipe(tmp_path, "partition-test", tokenizer=str(broken))
    output_root = str(tmp_path / "expanded")
    llm = af_llm_server_factory()
    conf = run_conf(
        str(drops / "{ds}"), output_root, llm.url, recipe_path, planning_mode="dated", shards_per_run=budget
    )
    run_env = {"AIRFLOW_CONN_MAGA_REGISTRY": postgres_registry_url, "AIRFLOW__CORE__MAX_MAP_LENGTH": "1024",
               **operator_env(recipe_path, llm.url)}

    done = dags_test_env.cli(
        "dags", "test", DAG_ID, ds, "-c", json.dumps(conf), extra_env=run_env, timeout=600, check=False
    )
    output = done.stdout + done.stderr
    assert "state=failed" in output, output[-5000:]  # a shard failed: so does the run (the watcher)

    # The budget is for flat corpora: the whole partition was published in this run.
    shards = registered(postgres_registry_url, recipe_id)
    assert sorted(shards) == [f"{ds}_part-{i:04d}" for i in range(good)]
    assert_output_clean(output_root, recipe_id, shards)
    poisoned = Registry(postgres_registry_url).shard(recipe_id, poisoned_shard)
    assert poisoned["status"] == "failed" and poisoned["attempts"] == 3, poisoned  # max_shard_failures
    assert "cannot load tokenizer" in poisoned["last_error"]

    (run_id, *_), = [r for r in dag_runs(dags_test_env) if str(r[1]).startswith(ds)]
    states = {(ti[0], ti[2] or ti[1]): (ti[3], ti[4]) for ti in task_instances(dags_test_env, run_id)}
    assert states[("publish_shard", poisoned_shard)] == ("failed", 3)  # no retry after the third failure
    assert sum(state == ("success", 1) for (task, _), state in states.items() if task == "publish_shard") == good
    assert states[("summarize", -1)][0] == "success" and states[("continue_run", -1)][0] == "skipped"
    assert states[("fail_if_shards_failed", -1)] == ("failed", 1)

    report = task_xcom(dags_test_env, run_id, "summarize")
    assert report["failed"] == 1 and [f["shard"] for f in report["failed_shards"]] == [poisoned_shard]
    assert report["failed_shards"][0]["status"] == "failed"
    assert (report["left"], report["pending"], report["failed_for_good"]) == (1, 0, 1)
    assert not report["complete"] and not report["continue"]
    # The asset event releases the others: shard, data URI and checksum of each.
    (extra,), = dags_test_env.query(
        "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = %(u)s",
        {"u": f"maga://corpus/{recipe_id}"},
    )
    manifest = {entry["shard"]: entry for entry in extra["manifest"]}
    assert set(manifest) == set(shards)
    assert all(manifest[name]["checksum"] == row["checksum"] and manifest[name]["data_uri"] == row["data_uri"]
               for name, row in shards.items())


# -- real scheduler: backfill -------------------------------------------------------------


def _latest_backfill_id(af) -> int:
    rows = af.query("SELECT max(id) FROM backfill WHERE dag_id = %(d)s", {"d": DAG_ID})
    return rows[0][0] or 0


def _backfill(af, from_date: str, to_date: str, conf: dict, *extra: str) -> int:
    before = _latest_backfill_id(af)
    af.cli(
        "backfill", "create", "--dag-id", DAG_ID, "--from-date", from_date, "--to-date", to_date,
        "--dag-run-conf", json.dumps(conf), *extra, timeout=120,
    )
    backfill_id = _latest_backfill_id(af)
    assert backfill_id > before, "airflow backfill create made no backfill"
    return backfill_id


def _wait_backfill(af, backfill_id: int, timeout: float = 420) -> list[tuple]:
    """Wait until the backfill completed; returns (run_id, logical_date, state) of its runs."""

    def done():
        (completed,), = af.query("SELECT completed_at FROM backfill WHERE id = %(i)s", {"i": backfill_id})
        runs = af.query(
            "SELECT r.run_id, r.logical_date, r.state FROM dag_run r"
            " JOIN backfill_dag_run b ON b.dag_run_id = r.id WHERE b.backfill_id = %(i)s ORDER BY r.logical_date",
            {"i": backfill_id},
        )
        if completed is not None and all(state in ("success", "failed") for _, _, state in runs):
            return runs
        return False

    return wait_for(done, timeout, 2.0, f"backfill {backfill_id}")


def test_backfill_processes_exactly_the_requested_partitions(
    airflow_stack, af_llm_server_factory, tmp_path, stack_operator
):
    from maga_tasks.data.sample_corpus import write_sample_corpus

    af = airflow_stack
    dates = ["2025-03-01", "2025-03-02", "2025-03-03", "2025-03-04", "2025-03-05"]
    source = tmp_path / "drops"
    write_sample_corpus(source, shards=1, docs_per_shard=3, partitions=dates)
    output_root = str(tmp_path / "expanded")
    recipe_path, recipe_id = write_recipe(tmp_path, "backfill-test")
    llm = af_llm_server_factory(latency_ms=20)
    conf = run_conf(str(source / "{ds}"), output_root, llm.url, recipe_path, planning_mode="dated")
    stack_operator(recipe_path, llm.url)

    backfill_id = _backfill(af, "2025-03-02", "2025-03-04T03:00:00", conf)
    runs = _wait_backfill(af, backfill_id)
    assert [str(r[1])[:10] for r in runs] == ["2025-03-02", "2025-03-03", "2025-03-04"]
    assert all(r[2] == "success" for r in runs), failure_report(af, runs)

    shards = registered(af.registry_url, recipe_id)
    partitions = sorted(date for date in dates for row in shards.values() if f"/{date}/" in row["source_uri"])
    assert partitions == ["2025-03-02", "2025-03-03", "2025-03-04"], shards.keys()
    assert len(shards) == 3
    assert_output_clean(output_root, recipe_id, shards)
    requests_after_first = llm.stats()["requests_total"]

    # The tasks ran on the Celery workers (the production executor), not in the scheduler.
    assert sum(w.log_text().count("Task execute_workload[") for w in af.workers) >= len(runs) * 3

    # Progress lines of the library are in the scheduler-run task logs too.
    logs = af.task_logs("publish_shard")
    assert logs and any(PROGRESS_LINE.search(read_task_log_text(p)) for p in logs)

    # The same backfill again, re-running the completed dates: nothing changes.
    again_id = _backfill(af, "2025-03-02", "2025-03-04T03:00:00", conf, "--reprocess-behavior", "completed")
    again = _wait_backfill(af, again_id)
    assert [str(r[1])[:10] for r in again] == ["2025-03-02", "2025-03-03", "2025-03-04"]
    assert all(r[2] == "success" for r in again), again
    assert llm.stats()["requests_total"] == requests_after_first, "re-running the backfill sent LLM requests"
    after = registered(af.registry_url, recipe_id)
    assert {k: (v["registered_at"], v["checksum"]) for k, v in after.items()} == {
        k: (v["registered_at"], v["checksum"]) for k, v in shards.items()
    }


# -- real scheduler: a task killed mid-shard ---------------------------------------------


def _task_process_talking_to(port: int, ancestors: set[int]):
    """The process (a descendant of our Airflow stack) with a connection to `port`."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if not ({p.pid for p in proc.parents()} & ancestors):
                continue
            if any(c.raddr and c.raddr.port == port for c in proc.net_connections(kind="tcp")):
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killed_shard_task_is_retried_and_resumes_from_checkpoint(
    airflow_stack, af_llm_server_factory, tmp_path, stack_operator
):
    from maga_tasks.data.sample_corpus import write_sample_corpus

    af = airflow_stack
    source = tmp_path / "corpus"
    write_sample_corpus(source, shards=1, docs_per_shard=24, offset=200)
    output_root = str(tmp_path / "expanded")
    recipe_path, recipe_id = write_recipe(tmp_path, "kill-test")
    llm = af_llm_server_factory(latency_ms=150)
    concurrency = 4
    conf = run_conf(str(source), output_root, llm.url, recipe_path, max_concurrency=concurrency)
    stack_operator(recipe_path, llm.url)

    backfill_id = _backfill(af, "2025-04-01", "2025-04-01T03:00:00", conf)
    stack_pids = {p.popen.pid for p in af.processes}

    work = Path(output_root) / recipe_id / "_work" / "part-0000"

    def some_documents_done():  # checkpointed, so the retry must not ask for them again
        return sum(len(p.read_bytes().splitlines()) for p in work.glob("part-*.jsonl")) >= 6

    wait_for(some_documents_done, 240, 0.3, "the shard task to finish a few documents")
    victim = wait_for(lambda: _task_process_talking_to(llm.port, stack_pids), 30, 0.2, "the task process")
    at_kill = dict(llm.stats()["by_doc"])
    os.kill(victim.pid, signal.SIGKILL)

    runs = _wait_backfill(af, backfill_id)
    assert [r[2] for r in runs] == ["success"], runs
    run_id = runs[0][0]
    (publish,) = [ti for ti in task_instances(af, run_id) if ti[0] == "publish_shard"]
    assert publish[3] == "success" and publish[4] >= 2, publish  # succeeded on a retry

    final = llm.stats()["by_doc"]
    started_before = {doc for doc, count in at_kill.items() if count > 0}
    requested_again = {doc for doc in started_before if final.get(doc, 0) > at_kill[doc]}
    # Only documents in flight at the kill are asked again; finished ones come from the checkpoint.
    assert len(requested_again) <= documents_in_flight(concurrency), (requested_again, at_kill, final)
    assert len(started_before - requested_again) >= 3

    xcom = af.query(
        "SELECT value FROM xcom WHERE dag_id = %(d)s AND run_id = %(r)s"
        " AND task_id = 'publish_shard' AND key = 'return_value'",
        {"d": DAG_ID, "r": run_id},
    )
    summary = xcom[0][0] if not isinstance(xcom[0][0], str) else json.loads(xcom[0][0])
    assert summary["status"] == "registered"
    if "resumed_documents" in summary:  # the retry's own account of what it took from the checkpoint
        assert summary["resumed_documents"] >= len(started_before - requested_again) - documents_in_flight(concurrency)

    shards = registered(af.registry_url, recipe_id)
    assert list(shards) == ["part-0000"] and shards["part-0000"]["documents"] == 24
    assert_output_clean(output_root, recipe_id, shards)
    attempts = sorted(p.name for p in af.task_logs("publish_shard") if f"run_id={run_id}" in str(p))
    assert attempts == ["attempt=1.log", "attempt=2.log"], attempts


# -- real scheduler: a partition continued in further runs ---------------------------------


def test_a_partition_past_max_map_length_continues_in_runs_the_dag_triggers(
    airflow_stack, af_llm_server_factory, tmp_path, stack_operator
):
    from maga_tasks.data.sample_corpus import write_sample_corpus

    af = airflow_stack
    ds = "2025-06-01"
    files = 2 * STACK_MAX_MAP_LENGTH + 1  # two full runs and one shard for a third
    drops = tmp_path / "drops"
    write_sample_corpus(drops, shards=files, docs_per_shard=1, partitions=[ds], offset=600)
    output_root = str(tmp_path / "expanded")
    recipe_path, recipe_id = write_recipe(tmp_path, "continue-test")
    llm = af_llm_server_factory()
    conf = run_conf(str(drops / "{ds}"), output_root, llm.url, recipe_path, planning_mode="dated", shards_per_run=1)
    stack_operator(recipe_path, llm.url)
    known = {r[0] for r in dag_runs(af)}
    af.cli(
        "dags", "trigger", DAG_ID, "-r", "partition-continue-test", "-l", f"{ds}T02:00:00+00:00", "-c", json.dumps(conf)
    )

    def all_runs_done():
        runs = [r for r in dag_runs(af) if r[0] not in known]
        registered_now = len(registered(af.registry_url, recipe_id))
        if runs and all(r[2] in ("success", "failed") for r in runs) and (registered_now == files or len(runs) >= 4):
            return runs
        return False

    runs = wait_for(all_runs_done, 600, 3.0, "the partition's runs")
    # At most max_map_length shards a run (the flat budget of 1 does not cut a partition):
    # the run, then two continuations the DAG triggered.
    assert len(runs) == 3 and all(r[2] == "success" for r in runs), failure_report(af, runs)
    first = [r for r in runs if r[0] == "partition-continue-test"]
    continuations = sorted((r for r in runs if r[0] != "partition-continue-test"), key=lambda r: r[0])
    assert first and all(r[0].startswith(f"continue__{ds}__") and r[1] is None for r in continuations), runs
    shards = registered(af.registry_url, recipe_id)
    assert sorted(shards) == [f"{ds}_part-{i:04d}" for i in range(files)]
    assert_output_clean(output_root, recipe_id, shards)

    reports = [task_xcom(af, run[0], "summarize") for run in runs]
    assert sorted(r["run_shards"] for r in reports) == [1, STACK_MAX_MAP_LENGTH, STACK_MAX_MAP_LENGTH]
    assert sorted(r["left"] for r in reports) == [0, 1, STACK_MAX_MAP_LENGTH + 1]
    last = next(r for r in reports if r["left"] == 0)
    assert last["complete"] and not last["continue"] and last["ds"] == ds
    assert all(r["continue"] for r in reports if r["left"])


def test_a_flat_budget_past_max_map_length_is_published_in_continuations_and_no_more(
    airflow_stack, af_llm_server_factory, tmp_path, stack_operator
):
    from maga_tasks.data.sample_corpus import write_sample_corpus

    af = airflow_stack
    budget, corpus = STACK_MAX_MAP_LENGTH + 2, STACK_MAX_MAP_LENGTH + 4
    source = tmp_path / "corpus"
    write_sample_corpus(source, shards=corpus, docs_per_shard=1, offset=700)
    output_root = str(tmp_path / "expanded")
    recipe_path, recipe_id = write_recipe(tmp_path, "flat-continue-test")
    llm = af_llm_server_factory()
    conf = run_conf(str(source), output_root, llm.url, recipe_path, shards_per_run=budget)
    stack_operator(recipe_path, llm.url)
    known = {r[0] for r in dag_runs(af)}
    af.cli("dags", "trigger", DAG_ID, "-r", "flat-continue-test", "-c", json.dumps(conf))

    def all_runs_done():
        runs = [r for r in dag_runs(af) if r[0] not in known]
        if runs and all(r[2] in ("success", "failed") for r in runs) and (
            len(registered(af.registry_url, recipe_id)) >= budget or len(runs) >= 3
        ):
            return runs
        return False

    runs = wait_for(all_runs_done, 600, 3.0, "the flat night's runs")
    # The run maps max_map_length shards, then one continuation the DAG triggered the rest.
    assert len(runs) == 2 and all(r[2] == "success" for r in runs), failure_report(af, runs)
    (continuation,) = [r for r in runs if r[0] != "flat-continue-test"]
    assert continuation[0].startswith("continue__flat__"), runs
    shards = registered(af.registry_url, recipe_id)
    assert sorted(shards) == [f"part-{i:04d}" for i in range(budget)]  # the budget, in name order
    assert_output_clean(output_root, recipe_id, shards)
    assert len(llm.stats()["by_doc"]) == budget  # no document of a shard past the budget was asked for

    first, last = (task_xcom(af, run_id, "summarize") for run_id in ("flat-continue-test", continuation[0]))
    assert (first["run_shards"], first["budget"], first["budget_left"], first["continue"]) == (
        STACK_MAX_MAP_LENGTH, budget, budget - STACK_MAX_MAP_LENGTH, True,
    )
    assert (last["run_shards"], last["budget"], last["budget_left"], last["continue"]) == (
        budget - STACK_MAX_MAP_LENGTH, budget - STACK_MAX_MAP_LENGTH, 0, False,
    )
    assert last["left"] == corpus - budget  # the next night's
    # The continuation carried the rest of the budget; its own continue_run found nothing to do.
    (run_conf_of_continuation,), = af.query(
        "SELECT conf FROM dag_run WHERE dag_id = %(d)s AND run_id = %(r)s", {"d": DAG_ID, "r": continuation[0]}
    )
    assert run_conf_of_continuation["shards_per_run"] == budget - STACK_MAX_MAP_LENGTH
    states = {(ti[0], ti[2] or ti[1]): ti[3] for ti in task_instances(af, continuation[0])}
    assert states[("continue_run", -1)] == "skipped"
    assert sorted(name for (task, name), state in states.items() if task == "publish_shard" and state == "success") == [
        f"part-{i:04d}" for i in range(STACK_MAX_MAP_LENGTH, budget)
    ]
