"""Fixtures for tests that run the pipeline through Airflow itself.

Registered as a plugin with `pytest_plugins = ["airflow_fixtures"]` (the Airflow test modules
do it; `tests/` is on sys.path through its conftest).

- `airflow_env` (session): an isolated AIRFLOW_HOME in a temp dir, Airflow's metadata DB
  in a fresh PostgreSQL database (dropped afterwards), `airflow db migrate`, the
  `maga_llm` pool, a SimpleAuthManager user with a known password, free ports, and a
  registry database given to the tasks as `AIRFLOW_CONN_MAGA_REGISTRY`.
- `airflow_stack` (session): a real scheduler (CeleryExecutor, Redis broker on
  127.0.0.1:6379) + two Celery workers + dag-processor + api-server on that environment,
  started on first use and stopped (by PID) at the end; its `core.max_map_length` is
  `STACK_MAX_MAP_LENGTH` (4). The workers stand for two machines (`CeleryWorker`): each
  its own process group, Celery hostname, log server port and vLLM endpoint (a test LLM
  server of its own, `MAGA_ENDPOINTS` in its environment), each consuming the session's
  shared queue (every task goes there) plus a queue of its own.
- `af_llm_server_factory` (function): starts `python -m maga_tasks.tools.test_server` processes on
  free loopback ports; `.stats()` reads `/_stats`.
- `postgres_registry_url` (function): an empty PostgreSQL database for the registry.

Every process started here is stopped by its own PID, never by name.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from maga_tasks.tools.airflow_stack import (  # shared with the scale benchmark
    create_pg_database,
    drop_pg_database,
    free_port,
    http_json,
    pg_url,
)
from maga_tasks.tools.test_server_process import TestServerProcess

REPO = Path(__file__).resolve().parent.parent
DAGS_FOLDER = REPO / "dags"
PLUGINS_FOLDER = REPO / "plugins"
ARTIFACTS = REPO / "artifacts"
DAG_ID = "maga_corpus_expansion"
POOL = "maga_llm"
PG_HOST = os.environ.get("MAGA_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MAGA_TEST_PGPORT", "5432"))
PG_USER = os.environ.get("MAGA_TEST_PGUSER", "postgres")
REDIS_HOST = os.environ.get("MAGA_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("MAGA_TEST_REDIS_PORT", "6379"))
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
ADMIN_USER = "admin"
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


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- PostgreSQL databases -------------------------------------------------------------


@pytest.fixture
def postgres_registry_url():
    name = create_pg_database("maga_registry")
    yield pg_url(name)
    drop_pg_database(name)


# -- processes ------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_offset: int = 0  # where its own output starts in the log (a restart appends)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill_machine(self) -> list[int]:
        """SIGKILL the process and everything it started, at once, as a machine lost.

        Airflow's supervisor puts each task process in a process group of its own, so the
        group we created is not enough: it is stopped first (no process in it forks a new
        task), then every descendant and the group are killed. Returns the killed pids.
        """
        import psutil

        pgid = self.popen.pid
        try:
            os.killpg(pgid, signal.SIGSTOP)
            descendants = psutil.Process(pgid).children(recursive=True)
        except (ProcessLookupError, psutil.NoSuchProcess):
            return []
        for proc in descendants:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        os.killpg(pgid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        psutil.wait_procs(descendants, timeout=10)
        return [pgid, *(proc.pid for proc in descendants)]

    def terminate(self) -> None:
        """SIGTERM the process group we created for it, without waiting."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)  # start_new_session: its own group
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process group we created for it, then SIGKILL what is left."""
        if self.popen.poll() is not None:
            return
        pgid = self.popen.pid
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def start_process(name: str, argv: list[str], env: dict, log_dir: Path) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as handle:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            argv,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(log_dir),
        )
    return ManagedProcess(name, popen, log_path, offset)


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


@dataclass
class AirflowEnv:
    """An isolated Airflow installation: home, metadata DB, config as environment."""

    home: Path
    database: str
    env: dict
    api_port: int
    password: str
    registry_database: str
    processes: list = field(default_factory=list)
    workers: list[CeleryWorker] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def registry_url(self) -> str:
        """The registry the stack's tasks and dashboard use (connection `maga_registry`)."""
        return pg_url(self.registry_database)

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def cli(self, *args: str, timeout: float = 300, check: bool = True, extra_env: dict | None = None):
        env = dict(self.env, **(extra_env or {}))
        result = subprocess.run(
            [AIRFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=str(self.home), check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"airflow {' '.join(args)} exited {result.returncode}\n"
                f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
            )
        return result

    def query(self, sql: str, params: dict | None = None) -> list[tuple]:
        """Read Airflow's metadata database directly (task states, tries, asset events)."""
        import psycopg

        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=self.database) as conn:
            return conn.execute(sql, params or {}).fetchall()

    def token(self) -> str:
        status, body = http_json(
            f"{self.api_url}/auth/token",
            method="POST",
            body={"username": ADMIN_USER, "password": self.password},
        )
        assert status in (200, 201), (status, body)
        return body["access_token"]

    def task_logs(self, task_id: str) -> list[Path]:
        return sorted(self.logs.glob(f"dag_id={DAG_ID}/**/task_id={task_id}/**/*.log"))


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

    def workloads(self) -> list[str]:
        """The `Executing workload` lines of its log: one per task try it started."""
        return [line for line in self.log_text().splitlines() if "Executing workload in Celery" in line]

    def consumed_queues(self) -> set[str]:
        """The queues its Celery banner lists (`.> NAME exchange=...` under `[queues]`)."""
        return set(re.findall(r"^\s+\.> (\S+) exchange=", self.log_text(), re.MULTILINE))

    def ready(self) -> bool:
        """Its current process is connected and consuming (Celery's `ready.` line)."""
        own_output = self.process.log_path.read_bytes()[self.process.log_offset :]
        return f"{self.hostname} ready.".encode() in own_output


def _airflow_environment(home: Path, database: str, api_port: int, passwords_file: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    db = pg_url(database, "postgresql+psycopg")
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": db,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # A lost worker's tasks are failed and retried within seconds, not minutes.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(STACK_HEARTBEAT_TIMEOUT_S),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "3",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
            # The DAG's deployment knobs, shortened for tests.
            "MAGA_RETRY_DELAY_SECONDS": "2",
            "MAGA_LEASE_TTL_SECONDS": "10",  # a killed try's retry waits for its lease to run out
            "MAGA_HEALTH_POKE_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name in ("MAGA_ENDPOINTS", "MAGA_SOURCE", "MAGA_OUTPUT_ROOT", "MAGA_RECIPE", "MAGA_PLANNING_MODE"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def airflow_env():
    home = Path(tempfile.mkdtemp(prefix="maga-airflow-"))
    database = create_pg_database("maga_airflow")
    password = secrets.token_urlsafe(12)
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps({ADMIN_USER: password}))
    api_port = free_port()
    registry_database = create_pg_database("maga_registry")
    env = _airflow_environment(home, database, api_port, passwords_file)
    env["AIRFLOW_CONN_MAGA_REGISTRY"] = pg_url(registry_database)
    af = AirflowEnv(home, database, env, api_port, password, registry_database)
    try:
        af.cli("db", "migrate", timeout=300)
        af.cli("pools", "set", POOL, "4", "vLLM request streams (tests)")
        yield af
    finally:
        for process in reversed(af.processes):  # all shut down at once, then each is waited for
            process.terminate()
        for process in reversed(af.processes):
            process.stop()
        drop_pg_database(database)
        drop_pg_database(registry_database)
        if os.environ.get("MAGA_KEEP_AIRFLOW_HOME"):
            print(f"kept AIRFLOW_HOME {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)


def _dag_serialized(af: AirflowEnv) -> bool:
    rows = af.query("SELECT count(*) FROM serialized_dag WHERE dag_id = %(d)s", {"d": DAG_ID})
    return rows[0][0] > 0


@pytest.fixture(scope="session")
def airflow_stack(airflow_env):
    """Scheduler + dag-processor + api-server + two Celery workers on `airflow_env`; returns the env."""
    af = airflow_env
    log_dir = af.home / "process-logs"
    # The DAG must be unpaused for the scheduler to start backfill runs; unpaused, it also
    # gets its latest scheduled run. Point that run's defaults at a healthy test LLM
    # server and an empty dated source, so it publishes nothing and finishes. (On the
    # workers, the `endpoints` default is each worker's own server: see below.)
    default_llm = start_llm_server(log_dir)
    af.processes.append(default_llm)
    af.env.update(
        MAGA_ENDPOINTS=default_llm.url,
        MAGA_PLANNING_MODE="dated",
        MAGA_SOURCE=str(af.home / "no-drops" / "{ds}"),
        MAGA_OUTPUT_ROOT=str(af.home / "expanded"),
    )
    # A small map limit, so that a partition or a flat budget of a few shards takes
    # several runs (the DAG continues past it); no other stack test maps more in a run.
    af.env["AIRFLOW__CORE__MAX_MAP_LENGTH"] = str(STACK_MAX_MAP_LENGTH)
    # The production executor: Celery with Redis as the broker (as in docker-compose). A
    # queue of this session's own keeps two test sessions on one Redis apart; every task
    # goes to it (`default_queue`) and both workers consume it, so shards spread over both
    # and a retry lands on whichever worker is alive.
    queue = f"maga-tests-{secrets.token_hex(4)}"
    af.env.update(
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CELERY__BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        AIRFLOW__CELERY__RESULT_BACKEND="db+" + pg_url(af.database, "postgresql+psycopg"),
        AIRFLOW__CELERY__WORKER_CONCURRENCY=str(WORKER_CONCURRENCY),
        AIRFLOW__OPERATORS__DEFAULT_QUEUE=queue,
    )
    for name, argv in (
        ("api-server", [AIRFLOW, "api-server", "--port", str(af.api_port), "--host", "127.0.0.1"]),
        ("dag-processor", [AIRFLOW, "dag-processor"]),
        ("scheduler", [AIRFLOW, "scheduler"]),
    ):
        af.processes.append(start_process(name, argv, af.env, log_dir))
    servers = [TestServerProcess(latency_ms=WORKER_LLM_LATENCY_MS, log_dir=log_dir).start() for _ in WORKER_NAMES]
    for name, llm in zip(WORKER_NAMES, servers):
        af.processes.append(llm.wait_ready())
        worker = CeleryWorker(
            name,
            hostname=f"{name}@{queue}",
            queues=(queue, f"{queue}.{name}"),
            llm=llm,
            # What differs from machine to machine: its endpoint and its log server's port.
            env=dict(af.env, MAGA_ENDPOINTS=llm.url, AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port())),
        )
        start_celery_worker(af, worker, log_dir)
        af.workers.append(worker)

    def ready():
        for process in af.processes:
            if not process.alive():
                raise AssertionError(f"{process.name} exited:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(f"{af.api_url}/api/v2/monitor/health", timeout=3) as response:
                if response.status != 200:
                    return False
        except OSError:
            return False
        return _dag_serialized(af)

    wait_for(ready, 180, 1.0, "api-server health and the DAG being parsed")
    wait_for(lambda: all(w.ready() for w in af.workers), 60, 0.5, "both Celery workers to be ready")
    af.cli("dags", "unpause", DAG_ID)
    yield af


def start_celery_worker(af: AirflowEnv, worker: CeleryWorker, log_dir: Path | None = None) -> ManagedProcess:
    """Start (or start again, after `kill_machine`) one worker of the stack."""
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
