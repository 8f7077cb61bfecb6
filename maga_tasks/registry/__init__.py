"""The metadata registry of shards, recipes and what was published.

`Registry` is the entry point; the modules below each own one job: `db` (URLs, engine,
transactions, column values), `migrations` (the schema runner), `queries` (all SQL),
`store` (the shard store), `reads` (the read model), `dashboard` (the dashboard's view).
"""

from maga_tasks.registry.db import (
    Database,
    database_url,
    iso,
    url_from_connection,
    utc_now,
)
from maga_tasks.registry.errors import (
    LeaseLost,
    RegistryConflict,
    RegistryError,
    RegistryNotFound,
    RegistryUnavailable,
    ShardBusy,
)
from maga_tasks.registry.migrations import Migrations, default_migrations_dir
from maga_tasks.registry.queries import STATUSES, WORKING_STATUSES
from maga_tasks.registry.reads import RegistryReads, format_totals
from maga_tasks.registry.registry import Registry
from maga_tasks.registry.store import ShardStore

__all__ = [
    "STATUSES",
    "WORKING_STATUSES",
    "Database",
    "LeaseLost",
    "Migrations",
    "Registry",
    "RegistryConflict",
    "RegistryError",
    "RegistryNotFound",
    "RegistryReads",
    "RegistryUnavailable",
    "ShardBusy",
    "ShardStore",
    "database_url",
    "default_migrations_dir",
    "format_totals",
    "iso",
    "url_from_connection",
    "utc_now",
]
