"""What the registry raises: every failure is a `RegistryError` (a `MagaError`, so a
command ends with its one-line message and the exit code its class carries)."""

from __future__ import annotations

from maga_tasks.errors import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_UNAVAILABLE, MagaError


class RegistryError(MagaError):
    """The registry cannot do what was asked (bad URL, unknown shard, schema too new)."""

    exit_code = EXIT_BAD_INPUT


class RegistryUnavailable(RegistryError):
    """The registry database cannot be reached (down, closed port, refused login). A
    passing fault: the lease keeper retries it; a command ends with one line."""

    exit_code = EXIT_UNAVAILABLE
    retryable = True


class RegistryNotFound(RegistryError):
    """A SQLite registry file that does not exist, for a command that must not create it."""


class RegistryConflict(RegistryError):
    """A registered shard was offered different content (another checksum)."""

    exit_code = EXIT_CONFLICT  # someone must look at both commits: retrying gives the same answer


class ShardBusy(RegistryError):
    """Another live worker holds the shard's lease."""

    exit_code = EXIT_CONFLICT
    retryable = True  # the lease runs out when its worker stops renewing it


class LeaseLost(RegistryError):
    """A lease holder's write was refused: its fencing token is stale (another worker
    took the shard over, or the shard was decided without it). The worker must stop and
    leave the shard to the current owner."""

    exit_code = EXIT_CONFLICT
    retryable = True  # a new try leases afresh, finds the shard decided or waits for its owner
