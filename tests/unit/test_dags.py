"""DAG integrity: the DAG files import cleanly, fast, without connections, network or
heavy libraries, and the nightly DAG has the structure operations rely on."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from tests.support.airflow import DAG_ID, DAGS_FOLDER, POOL

pytestmark = pytest.mark.airflow

DAG_FILE = DAGS_FOLDER / "maga_corpus_expansion.py"
# Modules a DAG file must not pull in at parse time (the scheduler parses it every 30 s).
HEAVY_MODULES = (
    "great_expectations",
    "boto3",
    "botocore",
    "pandas",
    "pyarrow",
    "aiohttp",
    "psycopg",
    "transformers",
    "tokenizers",
    "openlineage",
    "maga_tasks",
)
# ...except the run settings table, which the params are built from: pydantic models and
# their translation to Params, no I/O (maga_tasks/settings.py, maga_tasks/knobs.py,
# maga_tasks/run_params.py), the shards asset's name (maga_tasks/engine/assets.py) and the
# shard tasks' decorator (maga_tasks/lineage.py: Airflow's own modules only; the OpenLineage
# client is imported when an event is built).
PARSE_TIME_LIBRARY = {
    "maga_tasks", "maga_tasks.settings", "maga_tasks.knobs", "maga_tasks.run_params", "maga_tasks.redaction",
    "maga_tasks.engine", "maga_tasks.engine.assets", "maga_tasks.lineage",
}
CONSUMER_DAG_ID = "maga_shard_token_count"
CONSUMER_DAG_FILE = DAGS_FOLDER / f"{CONSUMER_DAG_ID}.py"


def _isolated_airflow_env() -> dict:
    home = tempfile.mkdtemp(prefix="maga-dagbag-")
    atexit.register(shutil.rmtree, home, True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MAGA_"))}
    env.update(
        AIRFLOW_HOME=home,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_FOLDER),
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
    )
    return env


@pytest.fixture(scope="module")
def dagbag():
    """Airflow's own DagBag over dags/, in this process, with an isolated AIRFLOW_HOME."""
    os.environ.update({k: v for k, v in _isolated_airflow_env().items() if k.startswith("AIRFLOW")})
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER), known_pools={POOL, "default_pool"})


@pytest.fixture(scope="module")
def nightly(dagbag):
    return dagbag.dags[DAG_ID]


def test_all_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}, dagbag.import_errors
    assert DAG_ID in dagbag.dags and CONSUMER_DAG_ID in dagbag.dags
    assert dagbag.size() >= 2


def test_shard_task_announces_on_the_asset_the_consumer_is_scheduled_on(dagbag, nightly):
    """publish_shard's outlet is the partitioned shards asset; the example consumer runs
    per partition of it (identity mapping: one run per shard name)."""
    from airflow.sdk import Asset, IdentityMapper, PartitionedAssetTimetable

    from maga_tasks.engine.assets import SHARDS_ASSET_NAME, SHARDS_ASSET_URI

    shards = Asset(name=SHARDS_ASSET_NAME, uri=SHARDS_ASSET_URI, group="maga")
    publish = nightly.get_task("publish_shard")
    assert publish.outlets == [shards] and publish.inlets == [shards]
    assert nightly.get_task("summarize").outlets[0].name == "maga-corpus"  # the run-level event stays
    consumer = dagbag.dags[CONSUMER_DAG_ID]
    assert isinstance(consumer.timetable, PartitionedAssetTimetable)
    assert consumer.timetable.asset_condition == shards
    assert isinstance(consumer.timetable.default_partition_mapper, IdentityMapper)
    assert consumer.task_ids == ["count_tokens"] and "maga" in consumer.tags and consumer.doc_md
    assert all(t.retries >= 1 and t.execution_timeout for t in consumer.tasks)


def test_schedule_tags_and_docs(nightly):
    assert nightly.catchup is False
    assert nightly.max_active_runs == 1
    assert "maga" in nightly.tags
    assert nightly.doc_md and "maga_llm" in nightly.doc_md
    assert nightly.schedule == "0 2 * * *"


def test_tasks_and_dependencies(nightly):
    assert set(nightly.task_ids) == {
        "wait_for_llm_workers", "plan_shards", "publish_shard", "summarize", "continue_run",
        "fail_if_shards_failed",
    }
    assert nightly.get_task("plan_shards").upstream_task_ids == {"wait_for_llm_workers"}
    assert nightly.get_task("publish_shard").upstream_task_ids == {"plan_shards"}
    assert nightly.get_task("summarize").upstream_task_ids == {"publish_shard", "plan_shards"}
    assert nightly.get_task("continue_run").upstream_task_ids == {"summarize"}
    # The summary runs when nothing was left to publish (mapped over zero shards) and when
    # shards failed (it names them and still releases the others).
    assert nightly.get_task("summarize").trigger_rule == "all_done"
    # ...and the run still fails when a shard task failed (the watcher pattern).
    watcher = nightly.get_task("fail_if_shards_failed")
    assert watcher.upstream_task_ids == {"publish_shard"} and watcher.trigger_rule == "one_failed"


def test_health_sensor_frees_its_slot(nightly):
    sensor = nightly.get_task("wait_for_llm_workers")
    assert sensor.mode == "reschedule"
    assert sensor.timeout > 0


def test_shard_task_is_mapped_pooled_retried_and_bounded(nightly):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    publish = nightly.get_task("publish_shard")
    assert isinstance(publish, MappedOperator)
    assert publish.pool == POOL
    assert publish.map_index_template and "shard" in publish.map_index_template
    assert publish.retries >= 2
    assert publish.retry_exponential_backoff and publish.retry_exponential_backoff > 1
    assert publish.max_retry_delay is not None
    assert publish.execution_timeout is not None and publish.execution_timeout >= timedelta(minutes=10)


def test_shard_task_describes_its_lineage(nightly):
    """The shard task's operator has the OpenLineage provider's methods (maga_tasks/lineage.py)."""
    operator = nightly.get_task("publish_shard").operator_class  # mapped: the class each shard's task is
    for method in ("get_openlineage_facets_on_start", "get_openlineage_facets_on_complete"):
        assert callable(getattr(operator, method, None)), method


def test_every_task_has_retries_and_a_timeout(nightly):
    for task in nightly.tasks:
        if task.task_id == "fail_if_shards_failed":
            assert task.retries == 0  # it only fails the run: nothing to retry
            continue
        assert task.retries >= 1, task.task_id
        if task.task_id == "wait_for_llm_workers":
            continue  # bounded by its sensor timeout instead
        assert task.execution_timeout is not None, task.task_id


def test_params_have_valid_defaults(nightly):
    params = nightly.params
    for name in (
        "source",
        "output_root",
        "recipe",
        "planning_mode",
        "shards_per_run",
        "pool_slots",
        "run_hours",
        "shard_hours",
        "max_docs_per_shard",
        "judge_sample_per_shard",
        "endpoints",
        "max_concurrency",
        "progress_interval_s",
        "partition_ds",
        "max_shard_failures",
        "requeue",
    ):
        assert name in params, name
    params.validate()
    resolved = {k: params[k] for k in params}
    assert resolved["planning_mode"] in ("flat", "dated")
    assert resolved["shards_per_run"] == 0  # from the fleet
    assert resolved["pool_slots"] == 8 and resolved["run_hours"] == 8 and resolved["shard_hours"] is None
    assert resolved["max_shard_failures"] == 3 and resolved["requeue"] == [] and resolved["partition_ds"] is None


def test_params_reject_bad_values(nightly):
    from airflow.sdk.exceptions import ParamValidationError

    for name, value in (
        ("planning_mode", "weekly"),
        ("shards_per_run", -1),
        ("pool_slots", 0),
        ("run_hours", 0),
        ("shard_hours", 0),
        ("endpoints", ["ftp://worker"]),
        ("max_docs_per_shard", 0),
        ("judge_sample_per_shard", -1),
        ("max_shard_failures", 0),
        ("partition_ds", "20261101"),
        ("requeue", "part-0000"),
    ):
        with pytest.raises(ParamValidationError):
            nightly.params.get_param(name).resolve(value)
    assert nightly.params.get_param("max_docs_per_shard").resolve(None) is None
    assert nightly.params.get_param("planning_mode").resolve("dated") == "dated"


def test_endpoints_and_recipe_are_not_taken_at_parse_time(monkeypatch):
    """The operator's endpoints and recipe are read when a task runs (run_conf checks a
    conf against them, tests/integration/hostile/test_run_conf.py): the params only carry
    a choice."""
    monkeypatch.setenv("MAGA_ENDPOINTS", "http://w1:8000, http://w2:8000/v1")
    monkeypatch.setenv("MAGA_RECIPE", "tiny")
    spec = importlib.util.spec_from_file_location("maga_dag_env_probe", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PARAMS["endpoints"].value == [] and module.PARAMS["recipe"].value is None


_PARSE_PROBE = textwrap.dedent(
    """
    import json, socket, sys, time
    import airflow.sdk  # the price every DAG file pays anyway
    from airflow.sdk import Connection
    from airflow.sdk.bases.hook import BaseHook

    lookups = []

    def refuse(*args, **kwargs):
        lookups.append(repr(args))
        raise RuntimeError("connection lookup at parse time")

    Connection.get = classmethod(refuse)
    BaseHook.get_connection = classmethod(refuse)

    def no_network(self, *args, **kwargs):
        lookups.append("socket.connect")
        raise RuntimeError("network access at parse time")

    socket.socket.connect = no_network
    before = set(sys.modules)
    started = time.perf_counter()
    import importlib.util
    spec = importlib.util.spec_from_file_location("maga_dag_parse_probe", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "seconds": elapsed,
        "new_modules": sorted(set(sys.modules) - before),
        "lookups": lookups,
    }))
    """
)


@pytest.fixture(scope="module", params=[DAG_FILE, CONSUMER_DAG_FILE], ids=lambda path: path.stem)
def parse_probe(request):
    env = _isolated_airflow_env()
    env["AIRFLOW_CONN_MAGA_REGISTRY"] = "postgresql://nobody:secret@127.0.0.1:9/nothing"
    return json.loads(_run_probe(_PARSE_PROBE, env, str(request.param))[-1])


def test_parse_is_fast(parse_probe):
    assert parse_probe["seconds"] < 1.0, parse_probe["seconds"]


def test_parse_imports_nothing_heavy(parse_probe):
    heavy = [m for m in parse_probe["new_modules"] if m.split(".")[0] in HEAVY_MODULES and m not in PARSE_TIME_LIBRARY]
    assert heavy == []


def test_parse_looks_up_no_connection_and_opens_no_socket(parse_probe):
    assert parse_probe["lookups"] == []


def _run_probe(code: str, env: dict, *args: str) -> list[str]:
    """Run a Python probe in a fresh interpreter; its stdout lines."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()


_PLUGIN_PROBE = textwrap.dedent(
    """
    from airflow import plugins_manager
    plugins, errors = plugins_manager._get_plugins()
    print([p.name for p in plugins])
    print(errors)
    """
)


def test_plugin_module_imports_without_an_api_server():
    """The plugin file itself must import cleanly (the api-server loads it at start)."""
    env = _isolated_airflow_env()
    env["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(Path(DAGS_FOLDER).parent / "plugins")
    names, errors = _run_probe(_PLUGIN_PROBE, env)[-2:]
    assert "maga_corpus" in names
    assert errors == "{}"


def test_run_settings_follow_the_params(nightly, monkeypatch):
    """The params a shard task hands the library: adaptive concurrency on unless the run
    pins it, the Data Docs sample rate as given."""
    spec = importlib.util.spec_from_file_location("maga_dag_for_settings", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("MAGA_API_KEY", "k")  # no connection lookup outside a task
    params = {k: nightly.params[k] for k in nightly.params} | {"endpoints": ["http://w1:8000"]}  # as _conf chose them
    settings = module._run_settings(params)
    assert settings.adaptive_concurrency and settings.max_concurrency == 128
    assert settings.data_docs_sample_rate == 0.01
    pinned = module._run_settings({**params, "adaptive_concurrency": False, "data_docs_sample_rate": 1.0})
    assert not pinned.adaptive_concurrency and pinned.data_docs_sample_rate == 1.0
