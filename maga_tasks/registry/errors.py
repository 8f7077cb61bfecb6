"""What the registry raises: every failure is a `RegistryError` (a `MagaError`, so a
command ends with its one-line message)."""

from __future__ import annotations

from maga_tasks.errors import MagaError


class RegistryError(MagaError):
    """The registry cannot do what was asked (bad URL, unknown shard, schema too new)."""


class RegistryUnavailable(RegistryError):
    """The registry database cannot be reached (down, closed port, refused login). A
    passing fault: the lease keeper retries it; a command ends with one line."""


class RegistryNotFound(RegistryError):
    """A SQLite registry file that does not exist, for a command that must not create it."""


class RegistryConflict(RegistryError):
    """A registered shard was offered different content (another checksum)."""


class ShardBusy(RegistryError):
    """Another live worker holds the shard's lease."""


class LeaseLost(RegistryError):
    """A lease holder's write was refused: its fencing token is stale (another worker
    took the shard over, or the shard was decided without it). The worker must stop and
    leave the shard to the current owner."""
