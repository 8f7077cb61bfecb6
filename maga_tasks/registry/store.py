"""The metadata registry: which shards exist, who works on them, what was published.

One class, `Registry`, owns the database (a SQLite file by default, PostgreSQL in
production) through SQLAlchemy Core with bound parameters only. Its schema lives in
`sql/` as ordered migrations that `upgrade()` applies once each.

Exactly-once publication rests on three statements, each atomic on both backends:
- `lease`: one conditional UPDATE; of two racing workers exactly one changes the row.
- `register`: one conditional UPDATE; a second call with the same checksum changes
  nothing, with another checksum it raises `RegistryConflict`.
- `quarantine`/`mark_failed`: conditional UPDATEs that never touch a registered shard.

Timestamps are fixed-width ISO-8601 UTC strings, so comparing strings compares times.
Lease expiry uses the workers' clocks; keep them in sync (NTP) and leases long compared
with any skew.
"""

from __future__ import annotations

import hashlib
from importlib import resources
import json
import logging
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url

from maga_tasks.errors import MagaError

if TYPE_CHECKING:
    from maga_tasks.recipe import Recipe
    from maga_tasks.engine.shard import ShardResult

log = logging.getLogger(__name__)

# How long a SQLite registry waits for another process's write lock.
SQLITE_BUSY_TIMEOUT_S = 60.0

STATUSES = (
    "planned",
    "leased",
    "expanding",
    "committed",
    "validated",
    "registered",
    "quarantined",
    "failed",
)
# States a worker may report while it holds the lease.
WORKING_STATUSES = ("leased", "expanding", "committed", "validated")

_MIGRATION_NAME = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")
_JSON_COLUMNS = ("rejects_by_reason", "progress", "failed_expectations", "label_summary")
_COUNTERS = (
    "documents",
    "accepted",
    "rejected",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "source_chars",
    "output_chars",
)


class RegistryError(MagaError):
    """The registry cannot do what was asked (bad URL, unknown shard, schema too new)."""


class RegistryConflict(RegistryError):
    """A registered shard was offered different content (another checksum)."""


class ShardBusy(RegistryError):
    """Another live worker holds the shard's lease."""


def default_migrations_dir() -> Path:
    """`MAGA_SQL_DIR`, else the migrations shipped as `maga_tasks.sql` (the repo's `sql/`)."""
    configured = os.environ.get("MAGA_SQL_DIR")
    if configured:
        return Path(configured)
    try:
        return Path(str(resources.files("maga_tasks.sql")))
    except ModuleNotFoundError:  # imported from a source checkout's folder: sql/ sits beside it
        return Path(__file__).resolve().parents[2] / "sql"


def database_url(url: str) -> str:
    """A SQLAlchemy URL from what users type: a file path, `sqlite:///...` or
    `postgresql://...` (driven by psycopg 3)."""
    url = str(url).strip()
    if not url:
        raise RegistryError("registry URL is empty")
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("postgresql+psycopg://", "sqlite://")):
        return url
    if "://" in url:
        raise RegistryError(f"unsupported registry URL (want a SQLite path or postgresql://): {url}")
    path = Path(url).expanduser().resolve()
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


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _row_dict(row) -> dict:
    out = dict(row._mapping)
    for name in _JSON_COLUMNS + ("statistics", "detail"):
        if name in out and isinstance(out[name], str):
            out[name] = _loads(out[name])
    if "success" in out and out["success"] is not None:
        out["success"] = bool(out["success"])
    return out


def _filters(*, recipe_id: str | None = None, status: str | None = None) -> tuple[str, dict]:
    """A WHERE clause holding only the filters given, with its bound parameters."""
    clauses, params = [], {}
    if recipe_id is not None:
        clauses.append("recipe_id = :rid")
        params["rid"] = recipe_id
    if status is not None:
        clauses.append("status = :status")
        params["status"] = status
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


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


def _split_statements(sql: str) -> list[str]:
    """Statements of a migration file: ';' ends a statement at the end of a line."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    statements, current = [], []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement:
                statements.append(statement)
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


class Registry:
    """The shard registry behind a SQLite file or a PostgreSQL database."""

    def __init__(self, url: str, *, migrations_dir: str | Path | None = None, echo: bool = False):
        self.url = database_url(url)
        self.migrations_dir = Path(migrations_dir) if migrations_dir else default_migrations_dir()
        self.dialect = make_url(self.url).get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise RegistryError(f"unsupported registry backend: {self.dialect}")
        self.engine: Engine = self._make_engine(echo)

    def __repr__(self) -> str:
        return f"Registry({make_url(self.url).render_as_string(hide_password=True)!r})"

    # -- connections -------------------------------------------------------------------

    def _make_engine(self, echo: bool) -> Engine:
        if self.dialect == "postgresql":
            return create_engine(self.url, echo=echo, pool_pre_ping=True, pool_size=2, max_overflow=4)
        engine = create_engine(self.url, echo=echo, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

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

    def _write(self):
        """A write transaction (committed on success, rolled back on error)."""
        return self.engine.begin()

    def _read(self) -> Connection:
        return self.engine.connect().execution_options(read_only=True)

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ------------------------------------------------------------------------

    def migrations(self) -> list[tuple[int, str, str]]:
        """(version, name, sql) of every migration file, in version order."""
        if not self.migrations_dir.is_dir():
            raise RegistryError(f"migrations folder not found: {self.migrations_dir} (set MAGA_SQL_DIR)")
        found = []
        for path in sorted(self.migrations_dir.glob("*.sql")):
            match = _MIGRATION_NAME.match(path.name)
            if not match:
                raise RegistryError(f"migration file name must be NNNN_name.sql: {path.name}")
            found.append((int(match.group(1)), match.group(2), path.read_text(encoding="utf-8")))
        versions = [version for version, _, _ in found]
        if len(set(versions)) != len(versions):
            raise RegistryError(f"duplicate migration versions in {self.migrations_dir}")
        return found

    def _applied(self, conn: Connection) -> dict[int, str]:
        if not inspect(conn).has_table("schema_version"):
            return {}
        rows = conn.execute(text("SELECT version, checksum FROM schema_version")).all()
        return {int(version): checksum for version, checksum in rows}

    def _lock_schema(self, conn: Connection) -> None:
        # SQLite: BEGIN IMMEDIATE already serialises writers. PostgreSQL: a transaction
        # advisory lock per schema, released at commit, serialises concurrent upgrades.
        if self.dialect == "postgresql":
            conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.maga_registry'))")
            )

    def schema_version(self) -> int:
        with self._read() as conn:
            applied = self._applied(conn)
        return max(applied, default=0)

    def upgrade(self) -> list[int]:
        """Apply pending migrations, each in its own transaction; return the versions
        applied now. Safe to run again and from several processes at once."""
        applied_now = []
        for version, name, sql in self.migrations():
            checksum = hashlib.sha256(sql.encode("utf-8")).hexdigest()
            with self._write() as conn:
                self._lock_schema(conn)
                applied = self._applied(conn)
                if version in applied:
                    if applied[version] != checksum:
                        log.warning("migration %04d_%s changed after it was applied", version, name)
                    continue
                newer = [v for v in applied if v > version]
                if newer:
                    raise RegistryError(
                        f"migration {version:04d} is missing from a database already at {max(newer):04d}"
                    )
                for statement in _split_statements(sql):
                    conn.exec_driver_sql(statement)
                conn.execute(
                    text(
                        "INSERT INTO schema_version (version, name, checksum, applied_at) "
                        "VALUES (:version, :name, :checksum, :at)"
                    ),
                    {"version": version, "name": name, "checksum": checksum, "at": iso(utc_now())},
                )
            applied_now.append(version)
            log.info("registry: applied migration %04d_%s", version, name)
        known = max((v for v, _, _ in self.migrations()), default=0)
        current = self.schema_version()
        if current > known:
            raise RegistryError(f"database schema {current} is newer than this code knows ({known})")
        return applied_now

    # -- recipes -----------------------------------------------------------------------

    def ensure_recipe(self, recipe: Recipe) -> str:
        """Record a recipe (a corpus version) once; return its id."""
        with self._write() as conn:
            conn.execute(
                text(
                    "INSERT INTO recipes (recipe_id, name, prompt_version, model, pairs_per_document,"
                    " recipe_yaml, created_at) VALUES (:rid, :name, :pv, :model, :pairs, :yaml, :at)"
                    " ON CONFLICT (recipe_id) DO NOTHING"
                ),
                {
                    "rid": recipe.recipe_id,
                    "name": recipe.name,
                    "pv": recipe.prompt_version,
                    "model": recipe.model,
                    "pairs": recipe.pairs_per_document,
                    "yaml": recipe.to_yaml(),
                    "at": iso(utc_now()),
                },
            )
        return recipe.recipe_id

    def recipes(self) -> list[dict]:
        """Every recipe with its shard counts, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                text(
                    "SELECT r.recipe_id, r.name, r.prompt_version, r.model, r.pairs_per_document,"
                    " r.recipe_yaml, r.created_at,"
                    " (SELECT COUNT(*) FROM shards s WHERE s.recipe_id = r.recipe_id) AS shards,"
                    " (SELECT COUNT(*) FROM shards s WHERE s.recipe_id = r.recipe_id"
                    "   AND s.status = 'registered') AS registered"
                    " FROM recipes r ORDER BY r.created_at, r.recipe_id"
                )
            ).all()
        return [_row_dict(row) for row in rows]

    # -- planning and leases -----------------------------------------------------------

    def _insert_planned(self, conn: Connection, recipe_id: str, shard: str, source_uri: str, now: str) -> None:
        conn.execute(
            text(
                "INSERT INTO shards (recipe_id, shard, source_uri, status, created_at, updated_at)"
                " VALUES (:rid, :shard, :uri, 'planned', :now, :now)"
                " ON CONFLICT (recipe_id, shard) DO NOTHING"
            ),
            {"rid": recipe_id, "shard": shard, "uri": source_uri, "now": now},
        )

    def _event(self, conn: Connection, recipe_id: str, shard: str, name: str, owner: str | None = None, **detail) -> None:
        conn.execute(
            text(
                "INSERT INTO shard_events (event_id, recipe_id, shard, event, owner, detail, created_at)"
                " VALUES (:id, :rid, :shard, :event, :owner, :detail, :at)"
            ),
            {
                "id": uuid.uuid4().hex,
                "rid": recipe_id,
                "shard": shard,
                "event": name,
                "owner": owner,
                "detail": _dumps(detail) if detail else None,
                "at": iso(utc_now()),
            },
        )

    def plan(
        self,
        shards: Iterable[tuple[str, str]],
        recipe_id: str,
        *,
        limit: int | None = None,
        include_quarantined: bool = False,
    ) -> list[tuple[str, str]]:
        """The `(source_uri, shard)` pairs that still need work, in the given order, at
        most `limit`: not registered and (unless asked) not quarantined, since a
        quarantined shard waits for a person, not for the next run. The pairs returned
        are recorded as planned; one query reads the recipe's shards, so planning a
        corpus of many thousand shards stays cheap."""
        wanted = list(shards)
        skip = {"registered"} | (set() if include_quarantined else {"quarantined"})
        with self._read() as conn:
            rows = conn.execute(
                text("SELECT shard, status, source_uri FROM shards WHERE recipe_id = :rid"),
                {"rid": recipe_id},
            ).all()
        known = {shard: (status, uri) for shard, status, uri in rows}
        pending = []
        for source_uri, shard in wanted:
            status, recorded_uri = known.get(shard, (None, source_uri))
            if recorded_uri != source_uri:
                raise RegistryError(
                    f"shard {shard!r} of {recipe_id} is recorded from {recorded_uri}, not {source_uri};"
                    " two source files map to one shard name"
                )
            if status not in skip:
                pending.append((source_uri, shard))
        if limit is not None:
            pending = pending[: max(limit, 0)]
        fresh = [(uri, shard) for uri, shard in pending if shard not in known]
        if fresh:
            now = iso(utc_now())
            with self._write() as conn:
                conn.execute(
                    text(
                        "INSERT INTO shards (recipe_id, shard, source_uri, status, created_at, updated_at)"
                        " VALUES (:rid, :shard, :uri, 'planned', :now, :now)"
                        " ON CONFLICT (recipe_id, shard) DO NOTHING"
                    ),
                    [{"rid": recipe_id, "shard": shard, "uri": uri, "now": now} for uri, shard in fresh],
                )
        return pending

    def lease(
        self,
        recipe_id: str,
        shard: str,
        source_uri: str,
        owner: str,
        ttl_s: float,
        *,
        force: bool = False,
    ) -> bool:
        """Take the shard for `owner` for `ttl_s` seconds; True when taken.

        Free, expired and own leases can be taken; a registered shard never; a
        quarantined one only with `force`. Exactly one of several racing callers wins.
        """
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = utc_now()
        params = {
            "rid": recipe_id,
            "shard": shard,
            "owner": owner,
            "now": iso(now),
            "expires": iso(now + timedelta(seconds=ttl_s)),
        }
        blocked = "('registered')" if force else "('registered', 'quarantined')"
        with self._write() as conn:
            self._insert_planned(conn, recipe_id, shard, source_uri, params["now"])
            previous = conn.execute(
                text("SELECT lease_owner, lease_expires_at FROM shards WHERE recipe_id = :rid AND shard = :shard"),
                params,
            ).one()
            taken = conn.execute(
                text(
                    "UPDATE shards SET status = 'leased', lease_owner = :owner,"
                    " lease_expires_at = :expires, attempts = attempts + 1, started_at = :now,"
                    " finished_at = NULL, updated_at = :now"
                    " WHERE recipe_id = :rid AND shard = :shard"
                    f" AND status NOT IN {blocked}"
                    " AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at < :now)"
                ),
                params,
            ).rowcount
            if taken:
                takeover = previous.lease_owner not in (None, owner)
                self._event(
                    conn,
                    recipe_id,
                    shard,
                    "takeover" if takeover else "lease",
                    owner,
                    ttl_s=ttl_s,
                    **({"previous_owner": previous.lease_owner} if takeover else {}),
                )
        return bool(taken)

    def release(self, recipe_id: str, shard: str, owner: str) -> bool:
        """Give the lease back (work not finished); the shard is free for the next run."""
        now = iso(utc_now())
        with self._write() as conn:
            released = conn.execute(
                text(
                    "UPDATE shards SET lease_owner = NULL, lease_expires_at = NULL, updated_at = :now,"
                    " status = CASE WHEN status IN ('leased', 'expanding') THEN 'planned' ELSE status END"
                    " WHERE recipe_id = :rid AND shard = :shard AND lease_owner = :owner"
                ),
                {"rid": recipe_id, "shard": shard, "owner": owner, "now": now},
            ).rowcount
            if released:
                self._event(conn, recipe_id, shard, "release", owner)
        return bool(released)

    def progress(
        self,
        recipe_id: str,
        shard: str,
        owner: str,
        *,
        status: str | None = None,
        counters: dict | None = None,
        ttl_s: float | None = None,
    ) -> bool:
        """Heartbeat of the lease holder: store its progress report, move the status
        forward, extend the lease. False when `owner` no longer holds the lease."""
        if status is not None and status not in WORKING_STATUSES:
            raise ValueError(f"progress status must be one of {WORKING_STATUSES}, not {status!r}")
        now = utc_now()
        assignments = ["updated_at = :now"]
        params: dict[str, Any] = {"rid": recipe_id, "shard": shard, "owner": owner, "now": iso(now)}
        if status is not None:
            assignments.append("status = :status")
            params["status"] = status
        if counters is not None:
            assignments.append("progress = :progress")
            params["progress"] = _dumps(counters)
            for name in _COUNTERS:
                value = counters.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    assignments.append(f"{name} = :{name}")
                    params[name] = int(value)
        if ttl_s is not None:
            assignments.append("lease_expires_at = :expires")
            params["expires"] = iso(now + timedelta(seconds=ttl_s))
        with self._write() as conn:
            changed = conn.execute(
                text(
                    f"UPDATE shards SET {', '.join(assignments)}"
                    " WHERE recipe_id = :rid AND shard = :shard AND lease_owner = :owner"
                    " AND status IN ('leased', 'expanding', 'committed', 'validated')"
                ),
                params,
            ).rowcount
        return bool(changed)

    # -- outcomes ----------------------------------------------------------------------

    @staticmethod
    def _result_params(result: ShardResult) -> dict:
        return {
            "uri": result.source_uri,
            "data_uri": result.data_uri,
            "rejected_uri": result.rejected_uri,
            "documents": int(result.documents),
            "accepted": int(result.accepted),
            "rejected": int(result.rejected),
            "requests": int(result.requests),
            "prompt_tokens": int(result.prompt_tokens),
            "completion_tokens": int(result.completion_tokens),
            "source_chars": int(result.source_chars),
            "output_chars": int(result.output_chars),
            "ratio": float(result.expansion_ratio),
            "reasons": _dumps(dict(sorted(result.rejects_by_reason.items()))),
        }

    _RESULT_ASSIGNMENTS = (
        "data_uri = :data_uri, rejected_uri = :rejected_uri, documents = :documents,"
        " accepted = :accepted, rejected = :rejected, requests = :requests,"
        " prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,"
        " source_chars = :source_chars, output_chars = :output_chars,"
        " expansion_ratio = :ratio, rejects_by_reason = :reasons"
    )

    def register(
        self,
        recipe_id: str,
        shard: str,
        result: ShardResult,
        checksum: str,
        *,
        docs_uri: str | None = None,
        label_summary: dict | None = None,
    ) -> bool:
        """Publish a validated shard. True when registered now; False when it already
        was with this checksum (a no-op). Another checksum raises `RegistryConflict`."""
        if not checksum:
            raise ValueError("a checksum is required to register a shard")
        now = iso(utc_now())
        params = self._result_params(result) | {
            "rid": recipe_id,
            "shard": shard,
            "checksum": checksum,
            "docs_uri": docs_uri,
            "labels": _dumps(label_summary),
            "now": now,
            "seconds": float(result.seconds) if result.seconds else None,
        }
        with self._write() as conn:
            self._insert_planned(conn, recipe_id, shard, result.source_uri, now)
            changed = conn.execute(
                text(
                    f"UPDATE shards SET status = 'registered', {self._RESULT_ASSIGNMENTS},"
                    " checksum = :checksum, docs_uri = COALESCE(:docs_uri, docs_uri),"
                    " label_summary = COALESCE(:labels, label_summary),"
                    " seconds = COALESCE(:seconds, seconds), lease_owner = NULL,"
                    " lease_expires_at = NULL, last_error = NULL, failed_expectations = NULL,"
                    " finished_at = :now, registered_at = :now, updated_at = :now"
                    " WHERE recipe_id = :rid AND shard = :shard AND status <> 'registered'"
                ),
                params,
            ).rowcount
            if changed:
                self._event(conn, recipe_id, shard, "register", None, checksum=checksum)
                return True
            registered = conn.execute(
                text("SELECT checksum FROM shards WHERE recipe_id = :rid AND shard = :shard"), params
            ).scalar_one()
        if registered != checksum:
            raise RegistryConflict(
                f"shard {shard!r} of {recipe_id} is registered with checksum {registered},"
                f" refusing different content {checksum}"
            )
        return False

    def _require_not_registered(self, conn: Connection, recipe_id: str, shard: str, action: str) -> None:
        status = conn.execute(
            text("SELECT status FROM shards WHERE recipe_id = :rid AND shard = :shard"),
            {"rid": recipe_id, "shard": shard},
        ).scalar_one_or_none()
        if status is None:
            raise RegistryError(f"unknown shard {shard!r} of {recipe_id}")
        if status == "registered":
            raise RegistryConflict(f"cannot {action} shard {shard!r} of {recipe_id}: it is registered")

    def quarantine(
        self,
        recipe_id: str,
        shard: str,
        reason: str,
        failed_expectations: list | None = None,
        *,
        source_uri: str | None = None,
        result: ShardResult | None = None,
        checksum: str | None = None,
        docs_uri: str | None = None,
    ) -> None:
        """Hold a shard back from publication, with why. A registered shard is never
        quarantined (`RegistryConflict`); publication is final for a recipe."""
        now = iso(utc_now())
        params: dict[str, Any] = {
            "rid": recipe_id,
            "shard": shard,
            "reason": reason,
            "failed": _dumps(failed_expectations or []),
            "checksum": checksum,
            "docs_uri": docs_uri,
            "now": now,
        }
        assignments = (
            "status = 'quarantined', last_error = :reason, failed_expectations = :failed,"
            " checksum = COALESCE(:checksum, checksum), docs_uri = COALESCE(:docs_uri, docs_uri),"
            " lease_owner = NULL, lease_expires_at = NULL, finished_at = :now, updated_at = :now"
        )
        if result is not None:
            params |= self._result_params(result)
            assignments += ", " + self._RESULT_ASSIGNMENTS
        with self._write() as conn:
            uri = source_uri or (result.source_uri if result is not None else None)
            if uri:
                self._insert_planned(conn, recipe_id, shard, uri, now)
            changed = conn.execute(
                text(
                    f"UPDATE shards SET {assignments}"
                    " WHERE recipe_id = :rid AND shard = :shard AND status <> 'registered'"
                ),
                params,
            ).rowcount
            if not changed:
                self._require_not_registered(conn, recipe_id, shard, "quarantine")
            self._event(conn, recipe_id, shard, "quarantine", None, reason=reason)
        log.warning("registry: quarantined %s/%s: %s", recipe_id, shard, reason)

    def mark_failed(self, recipe_id: str, shard: str, error: str, *, owner: str | None = None) -> bool:
        """Record a failed attempt and free the lease so a retry can take the shard.
        With `owner`, only that lease holder's attempt is marked. A registered shard is
        left alone (False)."""
        now = iso(utc_now())
        condition = " AND lease_owner = :owner" if owner else ""
        with self._write() as conn:
            changed = conn.execute(
                text(
                    "UPDATE shards SET status = 'failed', last_error = :error, lease_owner = NULL,"
                    " lease_expires_at = NULL, finished_at = :now, updated_at = :now"
                    " WHERE recipe_id = :rid AND shard = :shard AND status <> 'registered'"
                    + condition
                ),
                {"rid": recipe_id, "shard": shard, "error": error[:4000], "owner": owner, "now": now},
            ).rowcount
            if changed:
                self._event(conn, recipe_id, shard, "fail", owner, error=error[:1000])
        return bool(changed)

    def record_quality(
        self,
        recipe_id: str,
        shard: str,
        suite: str,
        success: bool,
        statistics: dict | None = None,
        failed_expectations: list | None = None,
        docs_uri: str | None = None,
    ) -> str:
        """Keep one data-quality run of a shard; returns the result id."""
        result_id = uuid.uuid4().hex
        statistics = statistics or {}
        with self._write() as conn:
            conn.execute(
                text(
                    "INSERT INTO quality_results (result_id, recipe_id, shard, suite, success,"
                    " evaluated, failed, statistics, failed_expectations, docs_uri, created_at)"
                    " VALUES (:id, :rid, :shard, :suite, :success, :evaluated, :failed,"
                    " :statistics, :failed_expectations, :docs_uri, :at)"
                ),
                {
                    "id": result_id,
                    "rid": recipe_id,
                    "shard": shard,
                    "suite": suite,
                    "success": 1 if success else 0,
                    "evaluated": int(statistics.get("evaluated_expectations", 0) or 0),
                    "failed": int(statistics.get("unsuccessful_expectations", len(failed_expectations or [])) or 0),
                    "statistics": _dumps(statistics),
                    "failed_expectations": _dumps(failed_expectations or []),
                    "docs_uri": docs_uri,
                    "at": iso(utc_now()),
                },
            )
        return result_id

    # -- reading -----------------------------------------------------------------------

    def shard(self, recipe_id: str, shard: str) -> dict | None:
        with self._read() as conn:
            row = conn.execute(
                text("SELECT * FROM shards WHERE recipe_id = :rid AND shard = :shard"),
                {"rid": recipe_id, "shard": shard},
            ).one_or_none()
        return _row_dict(row) if row is not None else None

    def shards(
        self, recipe_id: str | None = None, status: str | None = None, *, newest_first: bool = False,
        limit: int | None = None,
    ) -> list[dict]:
        """Shards by name, or most recently updated first; at most `limit` of them."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; one of {STATUSES}")
        where, params = _filters(recipe_id=recipe_id, status=status)
        order = "updated_at DESC, recipe_id, shard" if newest_first else "recipe_id, shard"
        sql = f"SELECT * FROM shards{where} ORDER BY {order}"
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = int(limit)
        with self._read() as conn:
            rows = conn.execute(text(sql), params).all()
        return [_row_dict(row) for row in rows]

    def recipe_ids(self) -> list[str]:
        """Every recipe with shards, stored recipe row or not (planning may come first)."""
        with self._read() as conn:
            return [row[0] for row in conn.execute(text("SELECT DISTINCT recipe_id FROM shards ORDER BY recipe_id"))]

    def _of_shards(
        self, table: str, id_column: str, recipe_id: str, shards: list[str], extra: str = ""
    ) -> dict[str, list[dict]]:
        """Rows of `table` for these shards (one query), oldest first, grouped by shard."""
        grouped: dict[str, list[dict]] = {name: [] for name in shards}
        if not shards:
            return grouped
        query = text(
            f"SELECT * FROM {table} WHERE recipe_id = :rid AND shard IN :shards{extra} ORDER BY created_at, {id_column}"
        ).bindparams(bindparam("shards", expanding=True))
        with self._read() as conn:
            for row in conn.execute(query, {"rid": recipe_id, "shards": list(shards)}):
                item = _row_dict(row)
                grouped[item["shard"]].append(item)
        return grouped

    def quality_results_of(self, recipe_id: str, shards: list[str]) -> dict[str, list[dict]]:
        """`quality_results` of many shards in one query: shard -> results, oldest first."""
        return self._of_shards("quality_results", "result_id", recipe_id, shards)

    def owner_events_of(self, recipe_id: str, shards: list[str]) -> dict[str, list[dict]]:
        """The events of many shards that name an owner, in one query, oldest first."""
        return self._of_shards("shard_events", "event_id", recipe_id, shards, " AND owner IS NOT NULL")

    def quality_results(self, recipe_id: str, shard: str) -> list[dict]:
        """Every quality run of a shard, oldest first."""
        return self.quality_results_of(recipe_id, [shard])[shard]

    def events(self, recipe_id: str, shard: str) -> list[dict]:
        """The audit trail of a shard, oldest first."""
        return self._of_shards("shard_events", "event_id", recipe_id, [shard])[shard]

    def totals(self, recipe_id: str | None = None, *, top: int = 20) -> dict:
        """Figures for reports and the dashboard. Shards are counted in every status;
        documents, rows, tokens and distributions cover registered (published) shards."""
        where_all, scope = _filters(recipe_id=recipe_id)
        where, _ = _filters(recipe_id=recipe_id, status="registered")
        with self._read() as conn:
            by_status = dict(
                conn.execute(text(f"SELECT status, COUNT(*) FROM shards{where_all} GROUP BY status"), scope).all()
            )
            sums = conn.execute(
                text(
                    "SELECT COUNT(*) AS shards, "
                    + ", ".join(f"COALESCE(SUM({name}), 0) AS {name}" for name in _COUNTERS)
                    + f", COALESCE(SUM(seconds), 0) AS seconds FROM shards{where}"
                ),
                scope | {"status": "registered"},
            ).one()
            details = conn.execute(
                text(f"SELECT rejects_by_reason, label_summary FROM shards{where}"),
                scope | {"status": "registered"},
            ).all()
        reasons: Counter = Counter()
        genres: Counter = Counter()
        audiences: Counter = Counter()
        for rejects_json, labels_json in details:
            reasons.update(_loads(rejects_json) or {})
            labels = _loads(labels_json) or {}
            genres.update({label: count for label, count in labels.get("genres", [])})
            audiences.update({label: count for label, count in labels.get("audiences", [])})
        figures = {name: int(getattr(sums, name)) for name in _COUNTERS}
        return {
            "recipe_id": recipe_id,
            "shards": sum(by_status.values()),
            "by_status": {status: int(by_status.get(status, 0)) for status in STATUSES},
            "registered_shards": int(sums.shards),
            **figures,
            "seconds": round(float(sums.seconds), 3),
            "expansion_ratio": round(figures["output_chars"] / figures["source_chars"], 4)
            if figures["source_chars"]
            else 0.0,
            "accepted_per_document": round(figures["accepted"] / figures["documents"], 4)
            if figures["documents"]
            else 0.0,
            "rejects_by_reason": dict(reasons.most_common()),
            "genres": genres.most_common(top),
            "audiences": audiences.most_common(top),
        }


def format_totals(totals: dict) -> str:
    """The `maga status` text: shards by status, then what the registered shards hold."""
    scope = totals.get("recipe_id") or "all recipes"
    by_status = "  ".join(f"{status}={count}" for status, count in totals["by_status"].items() if count)
    lines = [
        f"registry totals ({scope}): {totals['shards']} shards  {by_status or '(none)'}",
        (
            f"registered: {totals['registered_shards']} shards, {totals['documents']:,} documents,"
            f" {totals['accepted']:,} accepted / {totals['rejected']:,} rejected rows"
            f" ({totals['accepted_per_document']:.2f} accepted per document)"
        ),
        (
            f"tokens: {totals['prompt_tokens']:,} in / {totals['completion_tokens']:,} out;"
            f" chars: {totals['source_chars']:,} source -> {totals['output_chars']:,} output"
            f" (expansion x{totals['expansion_ratio']:.2f})"
        ),
    ]
    if totals["rejects_by_reason"]:
        lines.append(
            "rejects: " + ", ".join(f"{reason}={count}" for reason, count in totals["rejects_by_reason"].items())
        )
    for key in ("genres", "audiences"):
        if totals[key]:
            lines.append(f"top {key}: " + "; ".join(f"{label} ({count})" for label, count in totals[key][:5]))
    return "\n".join(lines)
