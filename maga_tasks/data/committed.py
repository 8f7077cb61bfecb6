"""Reading a shard's committed `data/` and `rejected/` files with memory flat in their
size: the checksum is streamed over the bytes, and the parquet files are read batch by
batch, only the columns asked for, each text column replaced by its length
(`text` -> `text_chars`), or by a figure measured on it (`genre_kept`, from `text` and
`genre`), before the next batch is read. No text is ever held whole.

On S3 each file is downloaded to a temporary file first (to disk, not to memory).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maga_tasks.data.storage import Storage
from maga_tasks.method.fidelity import genre_kept

# Rows read at once: bounds the memory of one batch (with 5 KB rewrites about 5 MB).
BATCH_ROWS = 1024
# Texts a reader measures instead of keeping: column -> the column of its lengths.
MEASURED = {"text": "text_chars", "genre": "genre_chars", "audience": "audience_chars"}
_MEASURED_FROM = {length: text for text, length in MEASURED.items()}


def _genre_kept(batch: pa.RecordBatch) -> pa.Array:
    """Whether each row's text shows its genre's form cue (null: the genre has none, or a
    file of another writer holds no string there)."""
    texts, genres = batch.column("text").to_pylist(), batch.column("genre").to_pylist()
    return pa.array(
        [genre_kept(t, g) if isinstance(t, str) and isinstance(g, str) else None
         for t, g in zip(texts, genres, strict=True)],
        pa.bool_(),
    )


# Figures a reader measures on several columns of a batch: name -> (columns, measure).
DERIVED = {"genre_kept": (("text", "genre"), _genre_kept)}
# Few distinct values per shard: read dictionary-encoded, a byte or two a row.
_DICTIONARY = ("source_shard", "recipe_id", "model", "prompt_version", "finish_reason", "reject_reason")
_CHUNK = 1 << 20


def file_digest(paths: Iterable[Path]) -> str:
    """sha256 of the files' bytes one after the other, read 1 MiB at a time."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def files_checksum(data: Path, rejected: Path) -> str:
    """The registry's checksum of a committed shard (`schema.shard_checksum`), streamed
    over the local files."""
    return file_digest((data, rejected))


@contextlib.contextmanager
def local_files(storage: Storage, *uris: str) -> Iterator[list[Path]]:
    """Local paths of `uris` (downloaded to temporary files from S3)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(storage.local_copy(uri)) for uri in uris]


def measure_batch(batch: pa.RecordBatch, wanted: tuple[str, ...]) -> pa.Table:
    """The `wanted` columns of a batch, a measured text as its length (null stays null)."""
    columns = {}
    for name in wanted:
        source = _MEASURED_FROM.get(name)
        if name in DERIVED:
            needs, derive = DERIVED[name]
            if all(column in batch.schema.names for column in needs):
                columns[name] = derive(batch)
        elif source is not None and source in batch.schema.names:
            column = batch.column(source)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                column = column.cast(pa.large_string())
            columns[name] = pc.utf8_length(column)
        elif name in batch.schema.names:
            columns[name] = batch.column(name)
    return pa.table(columns)


def read_measured(
    path: Path,
    wanted: tuple[str, ...],
    *,
    batch_rows: int = BATCH_ROWS,
    on_batch: Callable[[pa.RecordBatch], None] | None = None,
) -> pa.Table:
    """The `wanted` columns of a parquet file (present ones; `{text}_chars` names for
    the measured texts), read batch by batch. `on_batch` sees each raw batch first
    (for figures that need a text, e.g. labels). Raises arrow's errors for a bad file."""
    names = pq.read_schema(path).names
    sources = {_MEASURED_FROM.get(name, name) for name in wanted}
    sources.update(column for name in wanted if name in DERIVED for column in DERIVED[name][0])
    read = [c for c in names if c in sources]
    # Without pre-buffering (and with a small read buffer) arrow reads a row group's
    # column chunks as it decodes them: memory follows the batch, not the row group.
    parquet = pq.ParquetFile(
        path, read_dictionary=[c for c in _DICTIONARY if c in read], pre_buffer=False, buffer_size=_CHUNK
    )
    parts = []
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=read, use_threads=False):
        if on_batch is not None:
            on_batch(batch)
        parts.append(measure_batch(batch, wanted))
    if not parts:  # an empty file: its columns, no rows
        empty = parquet.schema_arrow.empty_table().select(read)
        return measure_batch(pa.RecordBatch.from_pylist([], schema=empty.schema), wanted)
    return pa.concat_tables(parts)


__all__ = [
    "BATCH_ROWS",
    "DERIVED",
    "MEASURED",
    "file_digest",
    "files_checksum",
    "local_files",
    "measure_batch",
    "read_measured",
]
