"""Helpers for tests that run the pipeline through Airflow itself: the pieces of
`maga_tasks.tools.airflow_stack` (shared with the scale benchmark), the stack's settings,
its Celery workers (each standing for a machine), and reading DAG runs, task instances
and task logs. The fixtures built from them (`airflow_env`, `airflow_stack`,
`af_llm_server_factory`, `postgres_registry_url`) are in tests/conftest.py: one stack per
test session, whatever tier asks for it.

Every process started here is stopped by its own PID, never by name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# Shared with the scale benchmark; DAGS_FOLDER, POOL, REPO and http_json are re-exported
# for the test modules.
from maga_tasks.tools.airflow_stack import (  # noqa: F401
    AIRFLOW,
    DAG_ID,
    DAGS_FOLDER,
    POOL,
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
    start_process,
    use_celery,
    wait_for,
    wait_stack_ready,
)
from maga_tasks.tools.test_server_process import TestServerProcess

ARTIFACTS = REPO / "artifacts"
# core.max_map_length of the scheduler stack (`airflow_stack`).
STACK_MAX_MAP_LENGTH = 4
# The stack's Celery workers: two "machines", two task slots each (4 in all, as the pool).
WORKER_NAMES = ("worker-a", "worker-b")
WORKER_CONCURRENCY = 2
# Each worker's own test LLM server answers this slowly, so a shard lasts long enough to
# lose its worker mid-way (runs that name `endpoints` in their conf use their own server).
WORKER_LLM_LATENCY_MS = 150
# [scheduler] task_instance_heartbeat_timeout of the stack: a task whose worker vanished
# is failed (and retried) this long after its last heartbeat (Airflow's default: 300 s).
# Supervisors heartbeat every 3 s ([workers] min_heartbeat_interval), so a slow machine
# has several beats of margin.
STACK_HEARTBEAT_TIMEOUT_S = 15


# -- the test LLM server --------------------------------------------------------------


def start_llm_server(log_dir: Path, *, latency_ms: float = 0, faults: tuple[str, ...] = ()) -> TestServerProcess:
    return TestServerProcess(faults=faults, latency_ms=latency_ms, log_dir=log_dir).start().wait_ready()


# -- Airflow --------------------------------------------------------------------------


@dataclass
class CeleryWorker:
    """One Celery worker of the stack, set up as a machine of its own would be."""

    name: str
    hostname: str  # Celery's node name, unique on the broker
    queues: tuple[str, ...]  # the shared queue first, then its own
    llm: TestServerProcess  # its vLLM endpoint
    env: dict
    process: ManagedProcess | None = None

    def log_text(self) -> str:
        return self.process.log_path.read_text(errors="replace") if self.process else ""

    def ready(self) -> bool:
        """Its current process is connected and consuming (Celery's `ready.` line)."""
        own_output = self.process.log_path.read_bytes()[self.process.log_offset :]
        return f"{self.hostname} ready.".encode() in own_output


def start_celery_worker(af: AirflowEnv, worker: CeleryWorker, log_dir: Path | None = None) -> ManagedProcess:
    """Start one worker of the stack."""
    argv = [
        AIRFLOW, "celery", "worker", "--celery-hostname", worker.hostname,
        "--queues", ",".join(worker.queues), "--concurrency", str(WORKER_CONCURRENCY),
    ]
    if worker.process is not None:
        af.processes.remove(worker.process)
    worker.process = start_process(f"celery-{worker.name}", argv, worker.env, log_dir or af.home / "process-logs")
    af.processes.append(worker.process)
    return worker.process


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


def wait_for_runs_finished(
    af: AirflowEnv, run_ids: set[str] | None = None, *, count: int | None = None, timeout: float = 300
):
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
