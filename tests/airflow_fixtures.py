"""Fixtures for tests that run the pipeline through Airflow itself.

Registered as a plugin with `pytest_plugins = ["airflow_fixtures"]` (the Airflow test modules
do it; `tests/` is on sys.path through its conftest).

- `airflow_env` (session): an isolated AIRFLOW_HOME in a temp dir, Airflow's metadata DB
  in a fresh PostgreSQL database (dropped afterwards), `airflow db migrate`, the
  `maga_llm` pool, a SimpleAuthManager user with a known password, free ports, and a
  registry database given to the tasks as `AIRFLOW_CONN_MAGA_REGISTRY`.
- `airflow_stack` (session): a real scheduler (CeleryExecutor, Redis broker on
  127.0.0.1:6379, a queue of its own; the stack itself is started by
  `maga_tasks.tools.airflow_stack`, which the scale benchmark shares) + Celery worker + dag-processor + api-server on that
  environment, started on first use and stopped (by PID) at the end; its
  `core.max_map_length` is `STACK_MAX_MAP_LENGTH` (8).
- `af_llm_server_factory` (function): starts `python -m maga_tasks.tools.test_server` processes on
  free loopback ports; `.stats()` reads `/_stats`.
- `postgres_registry_url` (function): an empty PostgreSQL database for the registry.

Every process started here is stopped by its own PID, never by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from maga_tasks.tools.airflow_stack import (  # noqa: F401  (re-exported to the test modules)
    ADMIN_USER,
    AIRFLOW,
    BIN,
    DAG_ID,
    DAGS_FOLDER,
    PG_HOST,
    PG_PORT,
    PG_USER,
    PLUGINS_FOLDER,
    POOL,
    REDIS_HOST,
    REDIS_PORT,
    REPO,
    AirflowEnv,
    ManagedProcess,
    create_pg_database,
    drop_pg_database,
    free_port,
    http_json,
    new_airflow_env,
    pg_url,
    remove_airflow_env,
    start_celery_stack,
    start_process,
    use_celery,
    wait_for,
    wait_stack_ready,
)
from maga_tasks.tools.test_server_process import TestServerProcess

ARTIFACTS = REPO / "artifacts"
# core.max_map_length of the scheduler stack (`airflow_stack`).
STACK_MAX_MAP_LENGTH = 8


# -- PostgreSQL databases -------------------------------------------------------------


@pytest.fixture
def postgres_registry_url():
    name = create_pg_database("maga_registry")
    yield pg_url(name)
    drop_pg_database(name)


# -- the test LLM server --------------------------------------------------------------


def start_llm_server(log_dir: Path, *, latency_ms: float = 0, faults: tuple[str, ...] = ()) -> TestServerProcess:
    return TestServerProcess(faults=faults, latency_ms=latency_ms, log_dir=log_dir).start().wait_ready()


@pytest.fixture
def af_llm_server_factory(tmp_path):
    started: list[TestServerProcess] = []

    def factory(**kwargs) -> TestServerProcess:
        server = start_llm_server(tmp_path / "llm-logs", **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


# -- Airflow --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def airflow_env():
    af = new_airflow_env(pool_slots=4)
    try:
        yield af
    finally:
        remove_airflow_env(af)


@pytest.fixture(scope="session")
def airflow_stack(airflow_env):
    """Scheduler + dag-processor + api-server + a Celery worker on `airflow_env`; returns the env."""
    af = airflow_env
    log_dir = af.home / "process-logs"
    # The DAG must be unpaused for the scheduler to start backfill runs; unpaused, it also
    # gets its latest scheduled run. Point that run's defaults at a healthy test LLM
    # server and an empty dated source, so it publishes nothing and finishes.
    default_llm = start_llm_server(log_dir)
    af.processes.append(default_llm)
    af.env.update(
        MAGA_ENDPOINTS=default_llm.url,
        MAGA_PLANNING_MODE="dated",
        MAGA_SOURCE=str(af.home / "no-drops" / "{ds}"),
        MAGA_OUTPUT_ROOT=str(af.home / "expanded"),
    )
    # A small map limit, so that a partition of 20 shards takes three runs (the DAG
    # continues a partition past it); every other stack test maps fewer shards.
    af.env["AIRFLOW__CORE__MAX_MAP_LENGTH"] = str(STACK_MAX_MAP_LENGTH)
    # The production executor: Celery with Redis as the broker, on a queue of its own.
    queue = use_celery(af, concurrency=4)
    start_celery_stack(af, log_dir, queue, concurrency=4)
    wait_stack_ready(af, 180)
    af.cli("dags", "unpause", DAG_ID)
    yield af


# -- runs -----------------------------------------------------------------------------


def dag_runs(af: AirflowEnv) -> list[tuple]:
    """(run_id, logical_date, state, run_type) of every run of the DAG."""
    return af.query(
        "SELECT run_id, logical_date, state, run_type FROM dag_run WHERE dag_id = %(d)s ORDER BY logical_date",
        {"d": DAG_ID},
    )


def task_instances(af: AirflowEnv, run_id: str) -> list[tuple]:
    """(task_id, map_index, rendered_map_index, state, try_number) of one run."""
    return af.query(
        "SELECT task_id, map_index, rendered_map_index, state, try_number FROM task_instance"
        " WHERE dag_id = %(d)s AND run_id = %(r)s ORDER BY task_id, map_index",
        {"d": DAG_ID, "r": run_id},
    )


def wait_for_runs_finished(af: AirflowEnv, run_ids: set[str] | None = None, *, count: int | None = None, timeout: float = 300):
    """Wait until the given runs (or `count` runs) all reached success or failed."""

    def finished():
        runs = dag_runs(af)
        if run_ids is not None:
            runs = [r for r in runs if r[0] in run_ids]
        if count is not None and len(runs) < count:
            return False
        if runs and all(r[2] in ("success", "failed") for r in runs):
            return runs
        return False

    return wait_for(finished, timeout, 2.0, f"DAG runs to finish ({run_ids or count})")


def read_task_log_text(path: Path) -> str:
    """Airflow 3 task logs are JSON lines; return their events as plain text lines."""
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            lines.append(raw)
            continue
        lines.append(str(record.get("event", raw)) if isinstance(record, dict) else raw)
    return "\n".join(lines)


PROGRESS_LINE = re.compile(r"\d+/\d+ docs, [\d.]+ req/s, [\d.]+ tok/s")


def failure_report(af: AirflowEnv, runs: list[tuple]) -> str:
    """Task states of the runs that did not succeed and the tails of their failed tasks'
    logs: what a red CI log needs to say why."""
    lines = []
    for run_id, _, state, *_ in runs:
        if state == "success":
            continue
        lines.append(f"run {run_id}: {state}")
        for task_id, map_index, rendered, ti_state, tries in task_instances(af, run_id):
            lines.append(f"  {task_id}[{rendered or map_index}] {ti_state} after {tries} tries")
            if ti_state not in ("success", "skipped"):
                for path in af.task_logs(task_id):
                    if f"run_id={run_id}" in str(path):
                        lines.append(f"    {path.name}: " + read_task_log_text(path)[-1500:].replace("\n", "\n      "))
    return "\n".join(lines)
