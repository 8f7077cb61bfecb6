"""`Registry`, the metadata registry: which shards exist, who works on them, what was
published, behind a SQLite file by default or a PostgreSQL database in production.

It is the shard store (`store.py`, on the recipes and planned shards of `planned.py`) and
its read model (`reads.py`) over one database
handle (`db.py`), with the schema migrations of `sql/` (`migrations.py`) that
`upgrade()` applies once each. All SQL lives in `queries.py`.
"""

from __future__ import annotations

from pathlib import Path

from maga_tasks.registry.db import Database
from maga_tasks.registry.migrations import Migrations
from maga_tasks.registry.reads import RegistryReads
from maga_tasks.registry.store import ShardStore


class Registry(ShardStore, RegistryReads):
    """The shard registry behind a SQLite file or a PostgreSQL database."""

    def __init__(self, url: str, *, migrations_dir: str | Path | None = None, echo: bool = False,
                 create: bool = True):
        """`create=False`: a SQLite file must exist (commands that only read create none)."""
        db = Database(url, echo=echo, create=create)
        ShardStore.__init__(self, db)
        RegistryReads.__init__(self, db)
        self.schema = Migrations(db, migrations_dir)
        self.url, self.dialect, self.engine = db.url, db.dialect, db.engine
        self.migrations_dir = self.schema.directory

    def __repr__(self) -> str:
        return f"Registry({self.db.shown_url()!r})"

    def close(self) -> None:
        self.db.close()

    # -- schema ------------------------------------------------------------------------

    def migrations(self) -> list[tuple[int, str, str]]:
        """(version, name, sql) of every migration file, in version order."""
        return self.schema.files()

    def schema_version(self) -> int:
        return self.schema.version()

    def upgrade(self) -> list[int]:
        """Apply pending migrations, each in its own transaction; return the versions
        applied now. Safe to run again and from several processes at once."""
        return self.schema.upgrade()
