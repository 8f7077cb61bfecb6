"""The fixtures every tier shares: real servers on loopback (the test LLM server, moto S3,
PostgreSQL schemas, the vLLM CPU engine, an isolated Airflow and its scheduler stack) and
sample data. Session-scoped servers are defined here only, so one of each serves a whole
run whatever tiers it collects. Helpers live in `tests.support`: tests import them from
there, never from a conftest."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from maga_tasks.llm.vllm_local import VllmServer, default_vllm_python, start_vllm_server
from maga_tasks.tools.test_server_process import TestServerProcess

# Before the helpers are imported, so that pytest rewrites their asserts.
pytest.register_assert_rewrite("tests.support")

from tests.support.airflow import (  # noqa: E402
    AIRFLOW,
    DAG_ID,
    STACK_HEARTBEAT_TIMEOUT_S,
    STACK_MAX_MAP_LENGTH,
    WORKER_CONCURRENCY,
    WORKER_LLM_LATENCY_MS,
    WORKER_NAMES,
    CeleryWorker,
    create_pg_database,
    drop_pg_database,
    new_airflow_env,
    pg_url,
    remove_airflow_env,
    start_celery_worker,
    start_llm_server,
    start_process,
    use_celery,
    wait_for,
    wait_stack_ready,
)
from tests.support.servers import PG_TEST_DSN, free_port, pg_test_user, stop_process, wait_http  # noqa: E402
from tests.support.vllm import BUILD_TINY_MODEL, TINY_SERVED_NAME, VLLM_MAX_MODEL_LEN  # noqa: E402

# -- the test LLM server, moto S3, sample data ------------------------------------------


@pytest.fixture
def llm_server_factory(tmp_path):
    servers: list[TestServerProcess] = []

    def start(
        *faults: str, latency_ms: float = 0, max_running: int | None = None, extra: list[str] = ()
    ) -> TestServerProcess:
        server = TestServerProcess(faults=faults, latency_ms=latency_ms, max_running=max_running, extra=extra,
                                   log_dir=tmp_path)
        servers.append(server.start())
        return server.wait_ready()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def llm_server(llm_server_factory) -> TestServerProcess:
    return llm_server_factory()


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 in server mode: real HTTP on loopback, not an in-process mock."""
    port = free_port()
    binary = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/moto-api/", process=process)
    yield url
    stop_process(process)


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """Credentials and endpoint for boto3 talking to the moto server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MAGA_S3_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture(scope="session")
def sample_articles():
    from maga_tasks.data.sample_corpus import wikipedia_summaries

    return wikipedia_summaries()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, sample_articles) -> Path:
    """A byte-level BPE tokenizer trained here on sample text, saved like a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator((a["text"] for a in sample_articles[:2000]), trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


# -- registries on SQLite and PostgreSQL -------------------------------------------------


@pytest.fixture
def pg_schema_url():
    """A registry URL on the test PostgreSQL server, in a fresh schema dropped afterwards."""
    import psycopg

    user = pg_test_user()
    schema = f"maga_t_{secrets.token_hex(5)}"
    with psycopg.connect(user=user, autocommit=True, **PG_TEST_DSN) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield (
        f"postgresql://{user}@{PG_TEST_DSN['host']}:{PG_TEST_DSN['port']}/{PG_TEST_DSN['dbname']}"
        f"?options=-csearch_path%3D{schema}"
    )
    with psycopg.connect(user=user, autocommit=True, **PG_TEST_DSN) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def registry_url(request, tmp_path):
    """Every registry test runs on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.db")
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def registry(registry_url):
    from maga_tasks.registry import Registry

    reg = Registry(registry_url)
    reg.upgrade()
    yield reg
    reg.close()


# -- the vLLM CPU engine (tests marked vllm) ---------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built maga-tiny (random weights, real tokenizer); ~3 s."""
    out_dir = tmp_path_factory.mktemp("models") / TINY_SERVED_NAME
    subprocess.run([sys.executable, str(BUILD_TINY_MODEL), str(out_dir)], check=True,
                   capture_output=True, text=True)
    return out_dir


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    python = default_vllm_python()
    if not python.exists():
        message = f"no vLLM virtualenv at {python} (scripts/setup_vllm_venv.sh)"
        if os.environ.get("MAGA_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def vllm_api_key() -> str:
    """A fresh key per run: tests can then look for it in logs."""
    return "maga-test-" + secrets.token_hex(12)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, vllm_python, vllm_api_key, tmp_path_factory):
    """One vLLM CPU server for the session, serving maga-tiny with an API key."""
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    server: VllmServer = start_vllm_server(
        tiny_model_dir,
        python=vllm_python,
        served_model_name=TINY_SERVED_NAME,
        max_model_len=VLLM_MAX_MODEL_LEN,
        api_key=vllm_api_key,
        log_path=log_path,
    )
    try:
        server.wait_healthy(timeout=300)
        yield server
    finally:
        server.stop()


# -- Airflow (tests marked airflow) ------------------------------------------------------


@pytest.fixture
def postgres_registry_url():
    name = create_pg_database("maga_registry")
    yield pg_url(name)
    drop_pg_database(name)


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


@pytest.fixture(scope="session")
def dags_test_env():
    """An Airflow environment that no scheduler ever runs on, for every `airflow dags test`
    case: `dags test` runs each task in-process, but a scheduler on the same metadata DB
    (the e2e stack's) would also queue the test run's tasks to its Celery workers, and
    `dags test` would wait for them (a refused run waited 500 s for its summarize)."""
    af = new_airflow_env(pool_slots=4)
    try:
        yield af
    finally:
        remove_airflow_env(af)


@pytest.fixture(scope="session")
def airflow_env():
    """The environment of the scheduler stack (`airflow_stack`); `dags test` runs on
    `dags_test_env` instead."""
    af = new_airflow_env(
        pool_slots=4,
        # A lost worker's tasks are failed and retried within seconds, not minutes.
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=str(STACK_HEARTBEAT_TIMEOUT_S),
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="2",
        AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL="3",
    )
    try:
        yield af
    finally:
        remove_airflow_env(af)


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
    queue = use_celery(af, concurrency=WORKER_CONCURRENCY)
    for name, argv in (
        ("api-server", [AIRFLOW, "api-server", "--port", str(af.api_port), "--host", "127.0.0.1"]),
        ("dag-processor", [AIRFLOW, "dag-processor"]),
        ("scheduler", [AIRFLOW, "scheduler"]),
    ):
        af.processes.append(start_process(name, argv, af.env, log_dir))
    servers = [TestServerProcess(latency_ms=WORKER_LLM_LATENCY_MS, log_dir=log_dir).start() for _ in WORKER_NAMES]
    for name, llm in zip(WORKER_NAMES, servers, strict=True):
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

    wait_stack_ready(af)
    wait_for(lambda: all(w.ready() for w in af.workers), 60, 0.5, "both Celery workers to be ready")
    af.cli("dags", "unpause", DAG_ID)
    yield af
