"""The servers the scale benchmark runs against: a PostgreSQL database of its own
(dropped at the end) and moto's S3 over HTTP, with a counter of the S3 requests sent."""

from __future__ import annotations

import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

PG_HOST = os.environ.get("MAGA_BENCH_PGHOST", "127.0.0.1")


PG_PORT = int(os.environ.get("MAGA_BENCH_PGPORT", "5432"))


def pg_user() -> str:
    """The PostgreSQL role: `MAGA_BENCH_PGUSER`, else root or postgres, whichever logs in."""
    import psycopg

    candidates = [os.environ["MAGA_BENCH_PGUSER"]] if os.environ.get("MAGA_BENCH_PGUSER") else ["root", "postgres"]
    for user in candidates:
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", connect_timeout=5):
                return user
        except psycopg.OperationalError:
            continue
    raise RuntimeError(f"no PostgreSQL at {PG_HOST}:{PG_PORT} for roles {candidates}")


class BenchDatabase:
    """A PostgreSQL database of this run, dropped at the end; `schema_url()` gives a
    registry URL in a fresh schema of it."""

    def __init__(self):
        import psycopg

        self.user = pg_user()
        self.name = f"maga_scale_{os.getpid()}_{secrets.token_hex(3)}"
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{PG_HOST}:{PG_PORT}/{self.name}"

    def schema_url(self, prefix: str) -> str:
        import psycopg

        schema = f"{prefix}_{secrets.token_hex(3)}"
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=self.user, dbname=self.name, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return f"{self.url}?options=-csearch_path%3D{schema}"

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def open_registry(url: str):
    from maga_tasks.registry import Registry

    registry = Registry(url)
    registry.upgrade()
    return registry


@contextmanager
def moto_server(log_dir: Path):
    """moto's S3 in server mode on a free loopback port; yields its URL."""
    import socket
    import urllib.request

    from maga_tasks.tools.airflow_stack import ManagedProcess, start_process

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    process: ManagedProcess = start_process(
        "moto", [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)], env, log_dir
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or not process.alive():
                    raise RuntimeError(f"moto server did not start:\n{process.log_tail()}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.stop()


def s3_credentials() -> None:
    """moto accepts any credentials; boto3 needs some. (The endpoint is passed to every
    call, never set in the environment the Airflow section hands on.)"""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def tiny_shard_bytes(rows: int = 2) -> bytes:
    """A small valid source parquet (tiny documents: the LLM is not the point here)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(rows)],
                             "text": [f"Tiny document {i}." for i in range(rows)]}), buffer)
    return buffer.getvalue()


def put_source_objects(endpoint: str, bucket: str, prefix: str, count: int) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    body = tiny_shard_bytes()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}part-{i:06d}.parquet", Body=body),
                      range(count)))


class S3RequestCounter:
    """Counts the HTTP requests sent by every S3 client made from boto3's default
    session from now on (botocore's `before-send` event; retries count too)."""

    def __init__(self):
        import boto3

        boto3.setup_default_session()
        self.requests: dict[str, int] = {}
        boto3.DEFAULT_SESSION.events.register("before-send.s3", self._count)

    def _count(self, request=None, **_) -> None:
        operation = getattr(request, "context", {}).get("operation_name") or getattr(request, "method", "?")
        self.requests[operation] = self.requests.get(operation, 0) + 1

    def total(self) -> int:
        return sum(self.requests.values())

    def reset(self) -> None:
        self.requests.clear()
