"""Committing one shard, exactly once, under its lease: the staged commit and its fencing.

A shard is committed when its `data/` file exists: the commit writes `rejected/`,
`magacorpus/` and `data/`, in that order, and nothing reads a shard as committed before
its last file is there (`is_committed`, the one place that question is asked).

The protocol, in the order a worker runs it:

1. **Write** (`write_commit`): the checkpoint's rows, in source order, become three
   parquet files in a local temporary directory, their metadata naming the source
   version they were made from.
2. **Fence check**: a worker whose lease was taken over stops here (`CommitFence.lost`,
   a flag the lease keeper sets; no database call).
3. **Stage**: the files are copied to `_work/{shard}/commit-{token}/`
   (`ShardPaths.staged`), where no other lease writes. Nothing published yet.
4. **Record** (`CommitFence.record_commit` -> `ShardStore.record_commit`): the
   checksum of the staged bytes is written to the registry by a conditional UPDATE
   that only matches while this token holds the shard. A stale token raises
   `LeaseLost` and the worker publishes nothing.
5. **Publish** (`publish_staged`): the staged files are copied to their places,
   `data/` last. From step 4 on, whoever holds the lease publishes these same staged
   bytes: a writer paused between its record and its copies can only write bytes of
   the recorded checksum.
6. **Resume** (`publish_earlier_commit`): the next owner of a shard whose recorded
   commit may not have been published finishes step 5 from the staged files (checked
   against the recorded checksum), then registers what is there without asking the
   LLM again. The registration (`engine.publish`) refuses files whose checksum is not
   the recorded one.

Without a fence (`maga expand-shard`, `commit_checkpoint`), steps 2-4 are skipped and
the files go straight to their places, `data/` last.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from maga_tasks.data.checkpoint import Checkpoint
from maga_tasks.data.committed import files_checksum, local_files, read_measured
from maga_tasks.data.figures import ACCEPTED_FIGURE_COLUMNS, FIGURE_COLUMNS, FigureTally, figures_of_files
from maga_tasks.data.layout import ShardPaths
from maga_tasks.data.outcome import ShardResult
from maga_tasks.data.schema import (
    ACCEPTED_SCHEMA,
    MAGACORPUS_SCHEMA,
    REJECTED_SCHEMA,
    SOURCE_IDENTITY_KEY,
    magacorpus_row,
    source_identity_of,
)
from maga_tasks.data.source import SourceDocument, SourceLimits, open_shard
from maga_tasks.data.storage import Storage
from maga_tasks.engine.job import ShardJob
from maga_tasks.engine.rows import BatchedWriter
from maga_tasks.errors import MagaError
from maga_tasks.method.cleaning import echo_judged_by
from maga_tasks.recipe import Recipe
from maga_tasks.registry import RegistryConflict
from maga_tasks.settings import RunSettings

log = logging.getLogger(__name__)


class CommitFence(Protocol):
    """The lease a shard is expanded and committed under (`engine.lease.LeaseKeeper`).

    A worker whose lease was taken over stops within a heartbeat and publishes nothing:
    its token is stale, and the registry refuses the commit of a stale token."""

    token: int

    def lost(self) -> BaseException | None:
        """The error to stop with once the lease is lost, else None (a flag: cheap)."""

    def record_commit(self, checksum: str) -> None:
        """Record the commit's checksum for this token before anything is published;
        raises (`LeaseLost`) when the token is stale."""

    def holds(self) -> bool:
        """Whether this token still holds the shard (False too when the registry cannot
        say); asked before the checkpoint is deleted."""


def is_committed(out: Storage, paths: ShardPaths) -> bool:
    """Whether the shard's files are all published: `data/` is written last."""
    return out.exists(paths.data) and out.exists(paths.rejected)


def source_limits(recipe: Recipe, settings: RunSettings | None = None) -> SourceLimits:
    """The bounds on one source row for a run: the recipe's `max_source_chars`, the
    settings' `max_line_bytes` (None: derived from it)."""
    return SourceLimits(recipe.quality.max_source_chars, settings.max_line_bytes if settings else None)


# -- 1. write ------------------------------------------------------------------------------


def write_commit(
    job: ShardJob, out: Storage, checkpoint: Checkpoint, documents: Iterable[SourceDocument], source_identity: str,
    fence: CommitFence | None = None,
) -> ShardResult:
    """Write rejected/, magacorpus/ and data/ from the checkpoint in source order, then
    publish them: through steps 2-5 with a fence, straight to their places without.

    `documents` streams the source again, in the same order, for raw_text. The files'
    parquet metadata name the source version (`SOURCE_IDENTITY_KEY`).
    """
    paths = job.paths
    identity = {SOURCE_IDENTITY_KEY: source_identity.encode()}
    tally = FigureTally(echo_judged_by(job.recipe.cleaning))
    with checkpoint.local_segments() as segments, tempfile.TemporaryDirectory(prefix="maga-commit-") as tmp:
        locations = Checkpoint.index(segments)
        data_path, rejected_path = Path(tmp) / "data.parquet", Path(tmp) / "rejected.parquet"
        export_path = Path(tmp) / "magacorpus.parquet"
        with (
            BatchedWriter(data_path, ACCEPTED_SCHEMA.with_metadata(identity)) as accepted,
            BatchedWriter(rejected_path, REJECTED_SCHEMA.with_metadata(identity)) as rejected,
            BatchedWriter(export_path, MAGACORPUS_SCHEMA.with_metadata(identity)) as export,
        ):
            for doc in documents:
                if doc.index not in locations:
                    raise MagaError(f"shard {paths.shard}: document {doc.index} is missing from the checkpoint")
                for row in Checkpoint.read(locations[doc.index]):
                    is_rejected = bool(row["reject_reason"])
                    tally.add(row, rejected=is_rejected, document=doc.index)
                    if is_rejected:
                        rejected.add(row)
                    else:
                        accepted.add(row)
                        export.add(magacorpus_row(row, doc.text))
        # The data file goes last: its presence is what marks the shard committed.
        built = {paths.rejected: rejected_path, paths.export: export_path, paths.data: data_path}
        if fence is not None:
            _publish_fenced(out, paths, built, fence)
        else:
            for uri, local in built.items():
                out.put_file(uri, local)
    return ShardResult.of(paths, job.source_uri, tally.figures(), source_identity=source_identity)


def commit_checkpoint(job: ShardJob) -> ShardResult:
    """Commit a shard whose checkpoint (`_work/{shard}/`) holds every document of its
    source, without any LLM call and without a fence: the commit step of `expand_shard`
    on its own (for `engine.publish.commit_and_validate`). `CheckpointMismatch` when the
    checkpoint was made from another version of the source."""
    out = job.storage()
    with (
        job.source_storage().local_copy(job.source_uri) as local,
        open_shard(local, job.source_uri, job.columns, source_limits(job.recipe)) as reader,
    ):
        identity = reader.identity()
        checkpoint = Checkpoint(out, job.paths.work, {})
        checkpoint.check_source(identity)
        return write_commit(job, out, checkpoint, iter(reader), identity)


# -- 2-5. fence check, stage, record, publish -----------------------------------------------


def _publish_fenced(out: Storage, paths: ShardPaths, built: dict[str, Path], fence: CommitFence) -> None:
    """Stage the files under the lease's token, record the commit, then publish them.

    Nothing reaches `data/`, `rejected/` or `magacorpus/` before the registry accepted
    the commit for this token, so a stale lease stops with nothing published.
    """
    if (error := fence.lost()) is not None:
        raise error
    for staged, published in paths.staged(fence.token):
        out.put_file(staged, built[published])
    fence.record_commit(files_checksum(built[paths.data], built[paths.rejected]))
    publish_staged(out, paths, fence.token)


def publish_staged(out: Storage, paths: ShardPaths, token: int) -> None:
    """Copy the commit staged under lease `token` to its published places, `data/` last."""
    for staged, published in paths.staged(token):
        out.copy(staged, published)


# -- 6. resume ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EarlierCommit:
    """A shard found committed by an earlier try: the checksum the registry recorded for
    that commit (its files must hold it), None when no commit was recorded (a commit
    made without a fence)."""

    recorded_checksum: str | None


def publish_earlier_commit(job: ShardJob, row: dict | None) -> EarlierCommit | None:
    """Finish the commit an earlier lease recorded and staged but may not have published
    (it stopped between its record and its copies): exactly the bytes of the recorded
    checksum. Returns the shard's earlier commit when its files are all published (now
    or before), None when the shard is not committed."""
    out = job.storage()
    recorded = _publish_recorded(out, job.paths, row or {})
    return EarlierCommit(recorded) if is_committed(out, job.paths) else None


def _publish_recorded(out: Storage, paths: ShardPaths, row: dict) -> str | None:
    """Publish the recorded commit's staged files when they are still there; the
    recorded checksum (None: no commit recorded)."""
    token = row.get("commit_token")
    if token is None:
        return None
    if not all(out.exists(uri) for uri, _ in paths.staged(token)):
        return row["checksum"]  # published already: staged files are deleted only after the copies
    checksum = staged_checksum(out, paths, token)
    if checksum != row["checksum"]:
        raise RegistryConflict(
            f"shard {paths.shard}: the commit staged by lease {token} has checksum {checksum},"
            f" the registry recorded {row['checksum']}"
        )
    log.info("shard %s: publishing the commit of lease %d (checksum %s)", paths.shard, token, checksum[:12])
    publish_staged(out, paths, token)
    return checksum


def staged_checksum(out: Storage, paths: ShardPaths, token: int) -> str:
    """The checksum of the commit staged under lease `token`, streamed."""
    staged = {published: uri for uri, published in paths.staged(token)}
    with local_files(out, staged[paths.data], staged[paths.rejected]) as (data, rejected):
        return files_checksum(data, rejected)


def committed_result(source_uri: str, paths: ShardPaths, out: Storage, recipe: Recipe) -> ShardResult:
    """The ShardResult of an already committed shard, read from its files batch by
    batch (texts measured, never kept): the engine's light read, where the output gate
    reads the same files whole (`quality.frames.load_committed`). The `recipe` says
    which rows its label-echo check judged (`cleaning.echo_judged_by`)."""
    with local_files(out, paths.data, paths.rejected) as (data, rejected):
        tables = [read_measured(data, ACCEPTED_FIGURE_COLUMNS), read_measured(rejected, FIGURE_COLUMNS)]
        identity = source_identity_of(data)
    figures = figures_of_files(*tables, echo_judged_by(recipe.cleaning))
    return ShardResult.committed(paths, source_uri, figures, identity)


__all__ = [
    "CommitFence",
    "EarlierCommit",
    "commit_checkpoint",
    "committed_result",
    "is_committed",
    "publish_earlier_commit",
    "publish_staged",
    "source_limits",
    "staged_checksum",
    "write_commit",
]
