"""The registry's database handle: URLs, one engine per backend, transactions, and how
values are stored in its columns.

A registry is a SQLite file by default and a PostgreSQL database in production, driven
through SQLAlchemy Core with bound parameters only. Timestamps are fixed-width ISO-8601
UTC strings, so comparing strings compares times; JSON columns hold text.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import InterfaceError, OperationalError

from maga_tasks.redaction import clean_text, redact_url
from maga_tasks.registry.errors import RegistryError, RegistryNotFound, RegistryUnavailable

# How long a SQLite registry waits for another process's write lock.
SQLITE_BUSY_TIMEOUT_S = 60.0

# Columns stored as JSON text, read back as Python values.
JSON_COLUMNS = (
    "rejects_by_reason",
    "progress",
    "failed_expectations",
    "label_summary",
    "statistics",
    "detail",
)


def database_url(url: str, *, create: bool = True) -> str:
    """A SQLAlchemy URL from what users type: a file path, `sqlite:///...` or
    `postgresql://...` (driven by psycopg 3). With `create=False` a SQLite file must
    exist already (a read-only command on a mistyped path creates nothing)."""
    url = str(url).strip()
    if not url:
        raise RegistryError("registry URL is empty")
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("postgresql+psycopg://"):
        return url
    if url.startswith("sqlite://"):
        file = make_url(url).database
        if not create and file and file != ":memory:" and not Path(file).is_file():
            raise RegistryNotFound(f"registry file not found: {file} (`maga db upgrade --registry` creates one)")
        return url
    if "://" in url:
        raise RegistryError(f"unsupported registry URL (want a SQLite path or postgresql://): {redact_url(url)}")
    path = Path(url).expanduser().resolve()
    if not create and not path.is_file():
        raise RegistryNotFound(f"registry file not found: {path} (`maga db upgrade --registry` creates one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def url_from_connection(conn_type: str, *, host: str | None, login: str | None = None,
                        password: str | None = None, port: int | None = None, schema: str | None = None) -> str:
    """A registry URL from the fields of a stored connection (e.g. an Airflow Connection)."""
    from urllib.parse import quote

    if conn_type == "sqlite":
        return host or ""
    if conn_type not in ("postgres", "postgresql"):
        raise RegistryError(f"a registry connection must be of type postgres or sqlite, not {conn_type!r}")
    auth = quote(login or "", safe="")
    if password:
        auth += ":" + quote(password, safe="")
    netloc = f"{auth}@{host}" if auth else (host or "")
    if port:
        netloc += f":{port}"
    return f"postgresql://{netloc}/{schema or ''}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """Fixed-width ISO-8601 UTC: string order equals time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(value: Any) -> str | None:
    """The text a JSON column stores for `value` (None stays NULL)."""
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def from_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def row_dict(row) -> dict:
    """A result row as a dict, its JSON columns decoded and `success` a bool."""
    out = dict(row._mapping)
    for name in JSON_COLUMNS:
        if name in out and isinstance(out[name], str):
            out[name] = from_json(out[name])
    if "success" in out and out["success"] is not None:
        out["success"] = bool(out["success"])
    return out


def _use_wal(cursor) -> None:
    """Put a SQLite file in WAL mode. The mode is stored in the file, so only the first
    connection switches it; the switch needs the file to itself and SQLite refuses it at
    once ("database is locked") rather than waiting, so a race of new processes retries."""
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + random.random() * 0.08)


def _sqlite_engine(url: str, echo: bool) -> Engine:
    engine = create_engine(url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    # pysqlite opens transactions lazily and never before DDL; take control so that
    # every write transaction is BEGIN IMMEDIATE: it holds the write lock from the
    # start, so two processes never both read a row and then both change it.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        mode = "DEFERRED" if connection.get_execution_options().get("read_only") else "IMMEDIATE"
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


class Database:
    """One registry database: its URL, backend and engine, and transactions on it."""

    def __init__(self, url: str, *, echo: bool = False, create: bool = True):
        self.url = database_url(url, create=create)
        self.dialect = make_url(self.url).get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise RegistryError(f"unsupported registry backend: {self.dialect}")
        if self.dialect == "postgresql":
            self.engine: Engine = create_engine(
                self.url, echo=echo, pool_pre_ping=True, pool_size=2, max_overflow=4
            )
        else:
            self.engine = _sqlite_engine(self.url, echo)

    def shown_url(self) -> str:
        """The URL with its password hidden, for logs and reprs."""
        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (committed on success, rolled back on error)."""
        with self.connect() as conn, conn.begin():
            yield conn

    def read(self) -> Connection:
        return self.connect().execution_options(read_only=True)

    def connect(self) -> Connection:
        """A connection; a database that cannot be reached is RegistryUnavailable, one
        line naming it (password hidden) and the driver's first line of why."""
        try:
            return self.engine.connect()
        except (OperationalError, InterfaceError) as error:
            lines = [line.strip() for line in str(error.orig or error).splitlines() if line.strip()]
            why = clean_text(lines[0] if lines else type(error.orig or error).__name__, 300)
            raise RegistryUnavailable(f"registry {redact_url(self.shown_url())} is unreachable: {why}") from None

    def close(self) -> None:
        self.engine.dispose()
