"""Schema migrations: the ordered plain-SQL files `NNNN_name.sql` of `sql/` and the runner
that applies each once, recording its version and checksum in `schema_version`.

A migration and its version row are one write transaction, taken under the schema lock
(SQLite: the BEGIN IMMEDIATE of every write; PostgreSQL: an advisory transaction lock),
so it is applied whole or not at all, and upgrades racing from several processes apply
it once. Each file is run by the database's own parser, not split by hand. PostgreSQL
gets the whole file in one `execute` without parameters, which psycopg 3 sends as one
simple query. SQLite's `executescript` is not used, because it COMMITs the open transaction
before it runs (Python 3.11, which this project supports, cannot turn that off), which
would release the write lock between the version check and the DDL; instead SQLite's
own tokenizer (`sqlite3.complete_statement`) says where each statement ends, and the
statements run one by one inside the transaction.

A migration that cannot be written portably (unnesting JSON, say) comes as one file per
dialect, `NNNN_name.sqlite.sql` and `NNNN_name.postgresql.sql`: each database applies
its own under the one version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from maga_tasks.registry import queries
from maga_tasks.registry.db import Database, iso, utc_now
from maga_tasks.registry.errors import RegistryError

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)(?:\.(sqlite|postgresql))?\.sql$")
# The file is SQL as written: no parameters, so the driver neither binds nor reads `%`.
_AS_WRITTEN = {"no_parameters": True}


def default_migrations_dir() -> Path:
    """`MAGA_SQL_DIR`, else the migrations shipped as `maga_tasks.sql` (the repo's `sql/`)."""
    configured = os.environ.get("MAGA_SQL_DIR")
    if configured:
        return Path(configured)
    # `maga_tasks.sql` has no __init__ (it is the plain `sql/` folder), so it imports as a
    # namespace package: its folder is the first search location.
    spec = importlib.util.find_spec("maga_tasks.sql")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "sql"  # a source checkout imported from its folder


def _sqlite_statements(sql: str) -> list[str]:
    """The statements of a script, each ending where SQLite's tokenizer sees a complete
    one (it knows string literals, comments and trigger bodies)."""
    import sqlite3

    statements, start = [], 0
    for end, char in enumerate(sql):
        if char == ";" and sqlite3.complete_statement(sql[start : end + 1]):
            statements.append(sql[start : end + 1])
            start = end + 1
    if sql[start:].strip():  # a last statement without ';', or trailing comments
        statements.append(sql[start:])
    return statements


class Migrations:
    """The migration files of one folder and the runner applying them to one database."""

    def __init__(self, db: Database, directory: str | Path | None = None):
        self.db = db
        self.directory = Path(directory) if directory else default_migrations_dir()

    def files(self) -> list[tuple[int, str, str]]:
        """(version, name, sql) of every migration this database applies, in version
        order: the portable file of a version, or the one for this database's dialect."""
        if not self.directory.is_dir():
            raise RegistryError(f"migrations folder not found: {self.directory} (set MAGA_SQL_DIR)")
        by_version: dict[int, dict[str, Path]] = {}
        for path in sorted(self.directory.glob("*.sql")):
            match = _MIGRATION_NAME.match(path.name)
            if not match:
                raise RegistryError(f"migration file name must be NNNN_name[.sqlite|.postgresql].sql: {path.name}")
            files = by_version.setdefault(int(match.group(1)), {})
            dialect = match.group(3) or "portable"
            # A version is one portable file, or one file per dialect.
            if files and (dialect == "portable" or "portable" in files or dialect in files):
                raise RegistryError(f"migration {match.group(1)} is given twice in {self.directory}")
            files[dialect] = path
        found = []
        for version, files in sorted(by_version.items()):
            path = files.get("portable") or files.get(self.db.dialect)
            if path is None:
                raise RegistryError(f"migration {version:04d} has no file for {self.db.dialect}")
            found.append((version, _MIGRATION_NAME.match(path.name).group(2), path.read_text(encoding="utf-8")))
        return found

    def _applied(self, conn: Connection) -> dict[int, str]:
        if not inspect(conn).has_table("schema_version"):
            return {}
        rows = conn.execute(queries.APPLIED_MIGRATIONS).all()
        return {int(version): checksum for version, checksum in rows}

    def _lock(self, conn: Connection) -> None:
        # SQLite: BEGIN IMMEDIATE already serialises writers. PostgreSQL: a transaction
        # advisory lock per schema, released at commit, serialises concurrent upgrades.
        if self.db.dialect == "postgresql":
            conn.execute(queries.LOCK_SCHEMA)

    def _run(self, conn: Connection, sql: str) -> None:
        """Run a whole migration file inside the open transaction (see the module doc)."""
        if self.db.dialect == "postgresql":
            conn.exec_driver_sql(sql, execution_options=_AS_WRITTEN)
            return
        for statement in _sqlite_statements(sql):
            conn.exec_driver_sql(statement, execution_options=_AS_WRITTEN)

    def version(self) -> int:
        """The newest migration applied to the database (0 for an empty one)."""
        with self.db.read() as conn:
            applied = self._applied(conn)
        return max(applied, default=0)

    def upgrade(self) -> list[int]:
        """Apply pending migrations, each in its own transaction; return the versions
        applied now. Safe to run again and from several processes at once."""
        applied_now = []
        for version, name, sql in self.files():
            checksum = hashlib.sha256(sql.encode("utf-8")).hexdigest()
            with self.db.write() as conn:
                self._lock(conn)
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
                self._run(conn, sql)
                conn.execute(
                    queries.RECORD_MIGRATION,
                    {"version": version, "name": name, "checksum": checksum, "at": iso(utc_now())},
                )
            applied_now.append(version)
            log.info("registry: applied migration %04d_%s", version, name)
        known = max((v for v, _, _ in self.files()), default=0)
        current = self.version()
        if current > known:
            raise RegistryError(f"database schema {current} is newer than this code knows ({known})")
        return applied_now
