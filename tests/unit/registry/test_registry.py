"""The shard registry without a server: database URLs, migration files, and processes
racing to open a new SQLite registry (the registry on SQLite and on PostgreSQL:
tests/integration/test_registry.py)."""

from __future__ import annotations

import pytest

from maga_tasks.registry import Registry, RegistryError, database_url
from tests.support.registry import race_upgrades

# -- URLs and migrations -------------------------------------------------------------------


def test_database_url_forms(tmp_path):
    assert database_url(str(tmp_path / "a" / "reg.db")) == f"sqlite:///{tmp_path}/a/reg.db"
    assert (tmp_path / "a").is_dir()
    assert database_url("sqlite:////x/y.db") == "sqlite:////x/y.db"
    assert database_url("postgresql://u@h:5432/db") == "postgresql+psycopg://u@h:5432/db"
    assert database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(RegistryError):
        database_url("mysql://u@h/db")


def test_processes_racing_to_open_a_new_sqlite_registry_all_succeed(tmp_path):
    # The first connection switches the file to WAL, which SQLite refuses at once (no busy
    # wait) while another process holds it; seen as "database is locked" in 2 of 15 rounds.
    for round_ in range(4):
        url = str(tmp_path / f"race-{round_}.db")
        applied = race_upgrades(url, 6)
        assert sorted(v for batch in applied for v in batch) == [v for v, _, _ in Registry(url).migrations()]


def test_a_migration_is_one_portable_file_or_one_per_dialect(tmp_path):
    from maga_tasks.registry import Registry

    folder = tmp_path / "sql"
    folder.mkdir()
    (folder / "0001_core.sql").write_text(
        "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name TEXT, checksum TEXT, applied_at TEXT);\n"
        "CREATE TABLE core (id INTEGER);"
    )
    (folder / "0002_fill.sqlite.sql").write_text("CREATE TABLE fill_sqlite (id INTEGER);")
    (folder / "0002_fill.postgresql.sql").write_text("CREATE TABLE fill_postgresql (id INTEGER);")
    registry = Registry(str(tmp_path / "r.db"), migrations_dir=folder)
    assert [(v, name) for v, name, _ in registry.migrations()] == [(1, "core"), (2, "fill")]
    assert registry.upgrade() == [1, 2]
    with registry.engine.connect() as conn:
        from sqlalchemy import inspect

        assert {"core", "fill_sqlite"} <= set(inspect(conn).get_table_names())
        assert "fill_postgresql" not in inspect(conn).get_table_names()
    (folder / "0002_fill.sql").write_text("SELECT 1;")
    with pytest.raises(RegistryError, match="given twice"):
        registry.migrations()
    (folder / "0002_fill.sql").unlink()
    (folder / "0002_fill.sqlite.sql").unlink()
    with pytest.raises(RegistryError, match="no file for sqlite"):
        registry.migrations()
    registry.close()
