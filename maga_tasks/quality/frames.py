"""What the gates measure, read from files: a shard's committed `data/` and `rejected/`
files (frames for GX, their figures, labels and checksum) and the ids and text lengths
of a source shard.

Files are read batch by batch (`data.committed`), only the columns the expectations
use; texts, genres and audiences are measured per batch and only their lengths are
handed to GX, which keeps memory near the size of the ids, whatever the texts weigh.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from maga_tasks.data.committed import (
    BATCH_ROWS,
    MEASURED,
    files_checksum,
    local_files,
    read_measured,
)
from maga_tasks.data.figures import ShardFigures, figures_of_files
from maga_tasks.data.layout import ShardPaths
from maga_tasks.data.schema import DUPLICATE_ID, LINEAGE_COLUMNS, source_identity_of
from maga_tasks.data.source import DEFAULT_COLUMNS, SourceColumns, measure_source, shard_format
from maga_tasks.data.storage import StorageError, storage_for
from maga_tasks.errors import EXIT_BAD_INPUT, MagaError, ShardInputError
from maga_tasks.quality.labels import LabelTally

if TYPE_CHECKING:
    import pandas as pd

# The lineage columns as GX sees them: a measured text by its length (`text_chars`).
MEASURED_LINEAGE = tuple(MEASURED.get(c, c) for c in LINEAGE_COLUMNS)
# Output columns measured by GX.
_ROW_COLUMNS = MEASURED_LINEAGE + (
    "keyword_coverage",
    "source_chars",
    "prompt_tokens",
    "completion_tokens",
    "pairs_prompt_tokens",
    "pairs_completion_tokens",
    # For the figures' fidelity counts (`data.figures`), not checked by GX.
    "invented_fact_count",
    "genre_kept",
)
_REJECTED_COLUMNS = (
    "source_id",
    "pair_index",
    "source_chars",
    "reject_reason",
    "prompt_tokens",
    "completion_tokens",
    "pairs_prompt_tokens",
    "pairs_completion_tokens",
    "invented_fact_count",
)
_LABEL_COLUMNS = ("genre", "audience", "pair_index")


class QualityError(MagaError):
    """A gate could not run (output files missing or unreadable)."""

    exit_code = EXIT_BAD_INPUT


# -- committed output files ------------------------------------------------------------


@dataclass
class CommittedShard:
    """The committed files of a shard, read once: frames for GX, their figures, labels
    and checksum. No text is kept: `text`, `genre` and `audience` are their lengths."""

    paths: ShardPaths
    rows: pd.DataFrame  # accepted rows; texts replaced by `text_chars` etc.
    rejected: pd.DataFrame
    checksum: str  # sha256 of the data file bytes followed by the rejected file bytes
    figures: ShardFigures  # measured on the files: what `ShardResult` reports
    labels: dict  # genre/audience summary of the accepted rows (`LabelTally`)
    source_identity: str | None = None  # the source version the files were made from

    def documents(self) -> pd.DataFrame:
        """One row per source document: accepted, rejected and total rows, its length.
        The rows of a repeated source id (`duplicate_id`) belong to no document, as in
        `ShardFigures`: the first row with the id is the document."""
        import pandas as pd

        rejected = self.rejected
        if "reject_reason" in rejected:
            rejected = rejected[rejected["reject_reason"] != DUPLICATE_ID]
        keys = ["source_id", "source_chars"]
        both = pd.concat(
            [self.rows.reindex(columns=keys), rejected.reindex(columns=keys)], ignore_index=True
        )
        frame = pd.DataFrame(
            {
                "accepted": self.rows.groupby("source_id").size() if "source_id" in self.rows else None,
                "rejected": rejected.groupby("source_id").size() if "source_id" in rejected else None,
                "source_chars": both.groupby("source_id")["source_chars"].max(),
            }
        )
        frame[["accepted", "rejected"]] = frame[["accepted", "rejected"]].fillna(0).astype("int64")
        frame["rows"] = frame["accepted"] + frame["rejected"]
        return frame.rename_axis("source_id").reset_index()


def _read(path: Path, uri: str, wanted: tuple[str, ...], batch_rows: int, labels: LabelTally | None = None) -> pa.Table:
    def count_labels(batch: pa.RecordBatch) -> None:
        labels.add({c: batch.column(c).to_pylist() for c in _LABEL_COLUMNS if c in batch.schema.names})

    try:
        return read_measured(path, wanted, batch_rows=batch_rows, on_batch=count_labels if labels else None)
    except (pa.ArrowException, OSError) as error:
        raise QualityError(f"cannot read committed file {uri}: {error}") from None


def load_committed(
    paths: ShardPaths, s3_endpoint_url: str | None = None, *, batch_rows: int = BATCH_ROWS,
    echo_judged_by: Collection[str] | None = None,
) -> CommittedShard:
    """Read a shard's committed `data/` and `rejected/` files (each read once, batch by
    batch of `batch_rows`). `echo_judged_by`: the recipe's reasons behind the
    label-echo rate (`cleaning.judged_by`; None: the rate is not measured)."""
    storage = storage_for(paths.data, s3_endpoint_url)
    missing = [uri for uri in (paths.data, paths.rejected) if not storage.exists(uri)]
    if missing:
        raise QualityError(f"shard {paths.shard} is not committed: missing {', '.join(missing)}")
    labels = LabelTally()
    try:
        with local_files(storage, paths.data, paths.rejected) as (data_path, rejected_path):
            checksum = files_checksum(data_path, rejected_path)
            rows = _read(data_path, paths.data, _ROW_COLUMNS, batch_rows, labels)
            rejected = _read(rejected_path, paths.rejected, _REJECTED_COLUMNS, batch_rows)
            identity = source_identity_of(data_path)
    except (StorageError, OSError) as error:
        raise QualityError(f"cannot read shard {paths.shard}: {error}") from None
    figures = figures_of_files(rows, rejected, echo_judged_by)
    return CommittedShard(
        paths, rows.to_pandas(), rejected.to_pandas(), checksum, figures, labels.summary(), identity
    )


# -- source shards ---------------------------------------------------------------------


def read_source_frame(
    source_uri: str, columns: SourceColumns = DEFAULT_COLUMNS, s3_endpoint_url: str | None = None
) -> pd.DataFrame:
    """The id and text length of every source row, as columns `{id}` and `{text}_chars`
    (named after the configured columns), and `{id}_repeated` (the id again on a later
    occurrence of it); a column absent from the file is absent from the frame and the
    gate reports it. Raises `ShardInputError` when the file cannot be read at all."""

    fmt = shard_format(source_uri)
    storage = storage_for(source_uri, s3_endpoint_url)
    try:
        with storage.local_copy(source_uri) as path:
            table = measure_source(path, fmt, columns, source_length_column(columns))
    except StorageError as error:
        raise ShardInputError(f"cannot read source shard {source_uri}: {error}") from None
    frame = table.to_pandas()
    if columns.id in frame:
        # The expansion keeps the first row of an id and rejects the later ones
        # (`duplicate_id`): only those are unusable rows, not every occurrence.
        # The column holds the id on those rows (shown in the report), null elsewhere.
        ids = frame[columns.id].astype(object)  # an integer id stays an integer beside nulls
        frame[repeated_id_column(columns)] = ids.where(ids.notna() & ids.duplicated(keep="first"))
    return frame


def repeated_id_column(columns: SourceColumns) -> str:
    """The input frame's column that holds the id of a later occurrence of it (null on
    a first one)."""
    return f"{columns.id}_repeated"


def source_length_column(columns: SourceColumns) -> str:
    """The frame column holding the text lengths: `{text}_chars`."""
    return f"{columns.text}_chars"


__all__ = [
    "DEFAULT_COLUMNS",
    "MEASURED_LINEAGE",
    "CommittedShard",
    "QualityError",
    "load_committed",
    "read_source_frame",
    "source_length_column",
]
