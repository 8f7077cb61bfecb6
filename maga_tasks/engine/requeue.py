"""Recovery: put quarantined or failed shards back into the plan.

A shard quarantined or failed because of a cause that is now fixed (a wrong key that
rejected every row before the fleet checks existed, a threshold, a prompt bug) has
output or a checkpoint that must not be reused. `requeue_shards` moves every file of the
shard (data, rejected, export, quality docs, checkpoint) under
`{version_root}/_quarantine/{shard}/{time}/` for audit, then sets the registry row back
to `planned` with one conditional UPDATE. Moving first makes a crash between the two
steps harmless: a second call finds nothing left to move and updates the row.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.storage import join, storage_for
from maga_tasks.identifiers import check_identifier
from maga_tasks.registry import Registry

log = logging.getLogger(__name__)

REQUEUABLE = ("quarantined", "failed")


def _move_aside(storage, source_uris: list[str], version_root: str, aside: str) -> int:
    """Copy each file (or every file under each folder) below `aside`, then delete it."""
    moved = 0
    for source in source_uris:
        below = storage.list(source)
        single = not below and storage.exists(source)
        for uri in [source] if single else below:
            target = join(aside, uri.removeprefix(version_root).lstrip("/"))
            with storage.local_copy(uri) as local:
                storage.put_file(target, local)
            moved += 1
        if single:
            storage.delete(source)
        else:
            storage.delete_prefix(source)
    return moved


def requeue_shards(
    registry: Registry, output_root: str, recipe_id: str, shards: list[str], s3_endpoint_url: str | None = None
) -> list[dict]:
    """Requeue each shard that is quarantined or failed; one summary dict per shard.

    The recipe id and every shard name are checked first (IdentifierError): they name the
    folders whose files move, so `../..` must never reach a path."""
    check_identifier(recipe_id, "recipe id")
    for shard in shards:
        check_identifier(shard, "shard name")
    storage = storage_for(output_root, s3_endpoint_url)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    summaries = []
    for shard in shards:
        row = registry.shard(recipe_id, shard)
        status = row["status"] if row else None
        if status not in REQUEUABLE:
            reason = "unknown shard" if row is None else f"status is {status}, not quarantined or failed"
            summaries.append({"shard": shard, "requeued": False, "status": status, "reason": reason})
            continue
        paths = shard_paths(output_root, recipe_id, shard)
        aside = join(paths.version_root, "_quarantine", shard, stamp)
        moved = _move_aside(storage, [paths.data, paths.rejected, paths.export, paths.quality_docs, paths.work],
                            paths.version_root, aside)
        requeued = registry.requeue(recipe_id, shard, moved_to=aside if moved else None)
        log.info("shard %s: %s, %d file(s) moved to %s",
                 shard, "requeued" if requeued else "not requeued", moved, aside)
        summaries.append({"shard": shard, "requeued": requeued, "status": "planned" if requeued else status,
                          "previous_status": status, "moved_files": moved, "moved_to": aside if moved else None})
    return summaries
