"""Shared fixtures: real servers on loopback (test LLM server, moto S3) and sample shards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from maga_tasks.tools.test_server_process import TestServerProcess

pytest_plugins = ["vllm_fixtures"]

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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


# -- registry and committed shards (registry / quality / publish tests) ------------------

PG_TEST_DSN = {"host": "127.0.0.1", "port": 5432, "dbname": "test"}


def _pg_test_user() -> str:
    """The PostgreSQL role for tests: the OS user `root` when it exists, else `postgres`."""
    import psycopg

    for user in ("root", "postgres"):
        try:
            with psycopg.connect(user=user, connect_timeout=5, **PG_TEST_DSN):
                return user
        except psycopg.OperationalError:
            continue
    pytest.fail("no PostgreSQL at 127.0.0.1:5432 (database 'test', role root or postgres)")


@pytest.fixture
def pg_schema_url():
    """A registry URL on the test PostgreSQL server, in a fresh schema dropped afterwards."""
    import secrets

    import psycopg

    user = _pg_test_user()
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


GENRES = (
    "A step-by-step tutorial that teaches the topic in plain language. It builds from basics to details.",
    "An analytical report with headings and evidence. The tone is neutral and precise.",
    "A friendly dialogue between a teacher and a curious student. It explains by questions and answers.",
    "A short story that carries the facts through characters. The tone is warm.",
    "A Q&A sheet for quick revision. Each answer is short and direct.",
)
AUDIENCES = (
    "High-school students preparing for exams. They know little about the subject.",
    "Retired engineers who read for pleasure. They like precise numbers.",
    "Busy parents with no background in the field. They want the essentials.",
    "University students in history. They want context and sources.",
    "Curious children aged ten to twelve. They like vivid examples.",
)


def write_committed_shard(
    output_root,
    recipe,
    shard: str,
    *,
    documents: int = 6,
    accepted_per_document: int | None = None,
    defects: tuple[str, ...] = (),
) -> "tuple[str, str]":
    """Write a realistic committed shard (`data/` + `rejected/` parquet with the output
    schemas) as expand_shard would; `defects` injects faults:
    duplicate_ids, empty_texts, low_coverage, low_yield, truncated."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from maga_tasks.data.layout import shard_paths
    from maga_tasks.data.schema import ACCEPTED_SCHEMA, REJECTED_SCHEMA, row_id

    pairs = recipe.pairs_per_document
    keep = accepted_per_document if accepted_per_document is not None else pairs - 1
    if "low_yield" in defects:
        keep = 1
    now = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)
    accepted, rejected = [], []
    for d in range(documents):
        source_id = f"doc-{d:04d}"
        source = (
            f"Document {d} explains how river deltas form where sediment settles as the current slows. "
            "Deltas shift over centuries, feed wetlands and farms, and are threatened by dams and rising seas. "
        ) * 2
        for p in range(pairs):
            text = (
                f"[{GENRES[p % len(GENRES)].split('.')[0]}] Rewrite {p} of document {d}: river deltas form where "
                "a slowing current drops its sediment. Over centuries they shift, feed wetlands and farmland, "
                "and today dams and rising seas threaten them. "
            ) * 2
            row = {
                "id": row_id(recipe.recipe_id, shard, source_id, p),
                "source_id": source_id,
                "source_shard": shard,
                "pair_index": p,
                "genre": GENRES[p % len(GENRES)],
                "audience": AUDIENCES[(p + d) % len(AUDIENCES)],
                "text": text,
                "recipe_id": recipe.recipe_id,
                "model": recipe.model,
                "prompt_version": recipe.prompt_version,
                "prompt_tokens": 220,
                "completion_tokens": len(text) // 4,
                "pairs_prompt_tokens": 180 if p == 0 else 0,
                "pairs_completion_tokens": 150 if p == 0 else 0,
                "finish_reason": "stop",
                "keyword_coverage": 0.6,
                "source_chars": len(source),
                "source_truncated_tokens": None,
                "source_meta": '{"title": "River deltas"}',
                "created_at": now,
            }
            if p < keep:
                accepted.append(row)
            else:
                rejected.append(row | {"reject_reason": "low_keyword_coverage", "reject_detail": "coverage 0.05"})
    if "duplicate_ids" in defects:
        accepted[1]["id"] = accepted[0]["id"]
    if "empty_texts" in defects:
        for row in accepted[:3]:
            row["text"] = ""
    if "low_coverage" in defects:
        for row in accepted[: len(accepted) // 2]:
            row["keyword_coverage"] = 0.05
    if "truncated" in defects:
        accepted[0]["finish_reason"] = "length"
    paths = shard_paths(str(output_root), recipe.recipe_id, shard)
    for uri, rows, schema in ((paths.data, accepted, ACCEPTED_SCHEMA), (paths.rejected, rejected, REJECTED_SCHEMA)):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), uri)
    return paths.data, paths.rejected


def write_source_shard(path, rows: list[dict]) -> str:
    """A source parquet shard from explicit rows (id/text and any other columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)
