"""A local Airflow stack: free ports, PostgreSQL databases, managed child processes
(each in a session of its own, stopped by its PID), the environment that points an
isolated AIRFLOW_HOME at a metadata database on PostgreSQL, and a scheduler +
dag-processor + api-server + Celery worker on it.

The scale benchmark runs it without pytest; the `airflow_stack` fixture of tests/conftest.py
builds the test session's stack (two workers standing for two machines) from the same pieces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from maga_tasks.tools.process_tree import descendants, started_at

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"
PLUGINS_FOLDER = REPO / "plugins"
PG_HOST = os.environ.get("MAGA_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("MAGA_TEST_PGPORT", "5432"))
PG_USER = os.environ.get("MAGA_TEST_PGUSER", "postgres")
REDIS_HOST = os.environ.get("MAGA_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("MAGA_TEST_REDIS_PORT", "6379"))
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
ADMIN_USER = "admin"
DAG_ID = "maga_corpus_expansion"
POOL = "maga_llm"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- PostgreSQL databases -------------------------------------------------------------


def _pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql)


def create_pg_database(prefix: str) -> str:
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    import psycopg

    try:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error as error:  # cleanup must not hide the caller's own result
        print(f"could not drop database {name}: {error}", file=sys.stderr)


def pg_url(dbname: str, driver: str = "postgresql") -> str:
    return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


# -- processes ------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_offset: int = 0  # where its own output starts in the log (a restart appends)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM the process group we created for it, without waiting."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)  # start_new_session: its own group
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process group we created for it, then SIGKILL what is left: of the
        group, and of the processes below it that left the group (the LocalExecutor's
        workers and their tasks do), found before they can be orphaned."""
        if self.popen.poll() is not None:
            return
        pgid = self.popen.pid
        tree = {pid: started_at(pid) for pid in descendants(pgid)}
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid, started in tree.items():
            if started is not None and started_at(pid) == started:  # alive: the group's signals missed it
                try:
                    os.kill(pid, signal.SIGKILL)
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


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; AssertionError on timeout (what
    a test reports as a failure, and the benchmark as a broken stack)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_json(url: str, *, method: str = "GET", body: dict | None = None, token: str | None = None,
              timeout: float = 10):
    """(status, parsed JSON or text) of one HTTP request; never raises on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


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
    workers: list = field(default_factory=list)  # the test stack's Celery "machines"

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


def airflow_environment(home: Path, database: str, api_port: int, passwords_file: Path) -> dict:
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
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
            # The DAG's deployment knobs, shortened for tests.
            "MAGA_RETRY_DELAY_SECONDS": "2",
            "MAGA_LEASE_TTL_SECONDS": "10",  # a killed try's retry waits for its lease to run out
            "MAGA_HEALTH_POKE_SECONDS": "2",
            # Tests and benches name sources and outputs in temporary folders by conf.
            "MAGA_DATA_ROOTS": tempfile.gettempdir(),
            "PYTHONUNBUFFERED": "1",
        }
    )
    for name in ("MAGA_ENDPOINTS", "MAGA_SOURCE", "MAGA_OUTPUT_ROOT", "MAGA_RECIPE", "MAGA_PLANNING_MODE"):
        env.pop(name, None)
    return env


def new_airflow_env(pool_slots: int = 4, **settings: str) -> AirflowEnv:
    """A migrated AirflowEnv (metadata and registry databases created on PostgreSQL, the
    `maga_llm` pool set); `remove_airflow_env` stops its processes and drops it all."""
    home = Path(tempfile.mkdtemp(prefix="maga-airflow-"))
    database = create_pg_database("maga_airflow")
    password = secrets.token_urlsafe(12)
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps({ADMIN_USER: password}))
    api_port = free_port()
    registry_database = create_pg_database("maga_registry")
    env = airflow_environment(home, database, api_port, passwords_file)
    env["AIRFLOW_CONN_MAGA_REGISTRY"] = pg_url(registry_database)
    env.update(settings)
    af = AirflowEnv(home, database, env, api_port, password, registry_database)
    try:
        af.cli("db", "migrate", timeout=300)
        af.cli("pools", "set", POOL, str(pool_slots), "vLLM request streams")
    except BaseException:
        remove_airflow_env(af)
        raise
    return af


def remove_airflow_env(af: AirflowEnv) -> None:
    for process in reversed(af.processes):  # all shut down at once, then each is waited for
        process.terminate()
    for process in reversed(af.processes):
        process.stop()
    drop_pg_database(af.database)
    drop_pg_database(af.registry_database)
    if os.environ.get("MAGA_KEEP_AIRFLOW_HOME"):
        print(f"kept AIRFLOW_HOME {af.home}", file=sys.stderr)
    else:
        shutil.rmtree(af.home, ignore_errors=True)


def use_celery(af: AirflowEnv, concurrency: int = 4) -> str:
    """Point the env at the production executor: Celery with Redis as the broker (as in
    docker-compose), on a queue of its own so two sessions on one Redis stay apart.
    Returns the queue."""
    queue = f"maga-{secrets.token_hex(4)}"
    af.env.update(
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CELERY__BROKER_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        AIRFLOW__CELERY__RESULT_BACKEND="db+" + pg_url(af.database, "postgresql+psycopg"),
        AIRFLOW__CELERY__WORKER_CONCURRENCY=str(concurrency),
        AIRFLOW__OPERATORS__DEFAULT_QUEUE=queue,
    )
    return queue


def start_celery_stack(af: AirflowEnv, log_dir: Path, queue: str, concurrency: int = 4) -> dict[str, ManagedProcess]:
    """api-server, dag-processor, scheduler and one Celery worker on `queue`, added to
    `af.processes`; returns them by name. `wait_stack_ready` waits for them."""
    started = {}
    for name, argv in (
        ("api-server", [AIRFLOW, "api-server", "--port", str(af.api_port), "--host", "127.0.0.1"]),
        ("dag-processor", [AIRFLOW, "dag-processor"]),
        ("scheduler", [AIRFLOW, "scheduler"]),
        ("celery-worker", [AIRFLOW, "celery", "worker", "--queues", queue, "--concurrency", str(concurrency)]),
    ):
        started[name] = start_process(name, argv, af.env, log_dir)
        af.processes.append(started[name])
    return started


def dag_serialized(af: AirflowEnv) -> bool:
    rows = af.query("SELECT count(*) FROM serialized_dag WHERE dag_id = %(d)s", {"d": DAG_ID})
    return rows[0][0] > 0


def wait_stack_ready(af: AirflowEnv, timeout: float = 180) -> None:
    """Until the api-server is healthy and the DAG is parsed; a process that exited fails it."""

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
        return dag_serialized(af)

    wait_for(ready, timeout, 1.0, "api-server health and the DAG being parsed")
