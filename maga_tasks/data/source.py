"""Source shards: listing them and streaming their documents with bounded memory.

A shard is one parquet, jsonl or jsonl.gz file. Rows that cannot be used (no id, no
text, text that is not UTF-8, a repeated id) are still yielded, marked with the reason,
so that they end up in the rejected output instead of disappearing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maga_tasks.data.schema import DUPLICATE_ID
from maga_tasks.errors import ShardInputError
from maga_tasks.data.storage import StorageError, is_s3, storage_for

SHARD_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class SourceColumns:
    id: str = "id"
    text: str = "text"


@dataclass
class SourceDocument:
    index: int  # position in the shard, the order of the output
    source_id: str
    text: str | None
    meta: dict = field(default_factory=dict)
    problem: str | None = None  # why it is rejected before any LLM call


def list_source_shards(source_uri: str, s3_endpoint_url: str | None = None) -> list[str]:
    """Sorted shard files under a directory or prefix, or the file itself."""
    storage = storage_for(source_uri, s3_endpoint_url)
    if source_uri.endswith(SHARD_SUFFIXES) and storage.exists(source_uri):
        return [source_uri]
    if not is_s3(source_uri) and not Path(source_uri).exists():
        raise ShardInputError(f"source not found: {source_uri}")
    try:
        found = storage.list(source_uri)
    except StorageError as error:
        raise ShardInputError(str(error)) from None
    # Files under "_"-prefixed folders (checkpoints, temp data) are never shards.
    prefix = source_uri.rstrip("/")
    return [
        uri
        for uri in found
        if uri.endswith(SHARD_SUFFIXES) and "/_" not in uri[len(prefix):] and "/." not in uri[len(prefix):]
    ]


def shard_format(uri: str) -> str:
    for suffix in SHARD_SUFFIXES:
        if uri.endswith(suffix):
            return suffix.lstrip(".")
    raise ShardInputError(f"unsupported shard format (want {', '.join(SHARD_SUFFIXES)}): {uri}")


def measure_source(path: Path, fmt: str, columns: SourceColumns, length_column: str) -> pa.Table:
    """The id and text length of every row of a local shard file, as columns `{id}`
    and `length_column`, read batch by batch so no text is kept (for the input gate).
    Rows stay as they are (a missing id is null); a column absent from the file is
    absent from the table, and a file with neither column keeps its row count."""
    if fmt == "parquet":
        return _measure_parquet(path, columns, length_column)
    return _measure_jsonl(path, fmt, columns, length_column)


def _measure_parquet(path: Path, columns: SourceColumns, length_column: str) -> pa.Table:
    parquet = _open_parquet(path)
    present = [c for c in (columns.id, columns.text) if c in parquet.schema_arrow.names]
    try:
        batches = [
            _id_and_length(batch, columns, length_column)
            for batch in parquet.iter_batches(batch_size=4096, columns=present)
        ]
    except (pa.ArrowException, OSError) as error:
        raise ShardInputError(f"{path.name}: not a readable parquet file ({error})") from None
    if not present:  # neither column: keep the row count so the report still says how many rows there were
        return pa.table({"_row": pa.nulls(parquet.metadata.num_rows, pa.int8())})
    if not batches:
        return _id_and_length(parquet.schema_arrow.empty_table().select(present), columns, length_column)
    return pa.concat_tables(batches)


def _id_and_length(batch: pa.RecordBatch | pa.Table, columns: SourceColumns, length_column: str) -> pa.Table:
    out = {}
    if columns.id in batch.schema.names:
        out[columns.id] = batch.column(columns.id)
    if columns.text in batch.schema.names:
        text = batch.column(columns.text)
        if pa.types.is_binary(text.type) or pa.types.is_large_binary(text.type):
            out[length_column] = pc.binary_length(text)
        else:
            out[length_column] = pc.utf8_length(text.cast(pa.large_string()))
    return pa.table(out)


def _measure_jsonl(path: Path, fmt: str, columns: SourceColumns, length_column: str) -> pa.Table:
    ids: list = []
    lengths: list = []
    seen = {"id": False, "text": False}
    for line in _jsonl_lines(path, fmt):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            ids.append(None)
            lengths.append(None)
            continue
        seen["id"] |= columns.id in record
        seen["text"] |= columns.text in record
        raw_id = record.get(columns.id)
        text = record.get(columns.text)
        ids.append(None if raw_id is None else str(raw_id))
        lengths.append(len(text) if isinstance(text, str) else None)
    out = {}
    if seen["id"]:
        out[columns.id] = pa.array(ids, pa.string())
    if seen["text"]:
        out[length_column] = pa.array(lengths, pa.int64())
    return pa.table(out) if out else pa.table({"_row": pa.array([None] * len(ids), pa.int8())})


def _open_parquet(path: Path) -> pq.ParquetFile:
    # Not pre-buffered: a row group's texts are read as they are decoded, batch by
    # batch, so a shard written as one big row group does not land in memory whole.
    try:
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as error:
        raise ShardInputError(f"{path.name}: not a readable parquet file ({error})") from None


def _jsonl_lines(path: Path, fmt: str) -> Iterator[bytes]:
    opener = gzip.open if fmt == "jsonl.gz" else open
    try:
        with opener(path, "rb") as handle:
            yield from handle
    except (OSError, EOFError) as error:
        raise ShardInputError(f"{path.name}: cannot read ({error})") from None


class ShardReader:
    """Reads one local shard file in batches; validates the columns on open."""

    def __init__(self, path: Path, fmt: str, columns: SourceColumns = SourceColumns(), batch_size: int = 256):
        self.path = Path(path)
        self.fmt = fmt
        self.columns = columns
        self.batch_size = batch_size
        self._seen_ids: set[bytes] = set()
        if fmt == "parquet":
            self._parquet = _open_parquet(self.path)
            names = self._parquet.schema_arrow.names
            missing = [c for c in (columns.id, columns.text) if c not in names]
            if missing:
                raise ShardInputError(
                    f"{self.path.name}: missing column(s) {missing}; found {names}"
                )

    def count(self) -> int:
        if self.fmt == "parquet":
            return self._parquet.metadata.num_rows
        return sum(1 for line in self._jsonl_lines() if line.strip())

    def __iter__(self) -> Iterator[SourceDocument]:
        self._seen_ids.clear()
        if self.fmt == "parquet":
            yield from self._iter_parquet()
        else:
            yield from self._iter_jsonl()

    # -- parquet -------------------------------------------------------------------

    def _iter_parquet(self) -> Iterator[SourceDocument]:
        index = 0
        try:
            for batch in self._parquet.iter_batches(batch_size=self.batch_size):
                ids = batch.column(self.columns.id).to_pylist()
                texts = _texts_of(batch.column(self.columns.text))
                others = [n for n in batch.schema.names if n not in (self.columns.id, self.columns.text)]
                other_values = {n: batch.column(n).to_pylist() for n in others}
                for row, (raw_id, text) in enumerate(zip(ids, texts)):
                    meta = {n: other_values[n][row] for n in others}
                    yield self._document(index, raw_id, text, meta)
                    index += 1
        except (pa.ArrowException, OSError) as error:
            raise ShardInputError(f"{self.path.name}: corrupt parquet data after row {index} ({error})") from None

    # -- jsonl -----------------------------------------------------------------------

    def _jsonl_lines(self) -> Iterator[bytes]:
        return _jsonl_lines(self.path, self.fmt)

    def _iter_jsonl(self) -> Iterator[SourceDocument]:
        index = 0
        for line in self._jsonl_lines():
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield SourceDocument(index, f"#row{index}", None, {}, "invalid_utf8")
            except json.JSONDecodeError:
                yield SourceDocument(index, f"#row{index}", None, {}, "invalid_json_line")
            else:
                if not isinstance(record, dict):
                    yield SourceDocument(index, f"#row{index}", None, {}, "invalid_json_line")
                else:
                    raw_id = record.pop(self.columns.id, None)
                    text = record.pop(self.columns.text, None)
                    yield self._document(index, raw_id, text, record)
            index += 1

    # -- shared ----------------------------------------------------------------------

    def _document(self, index: int, raw_id, text, meta: dict) -> SourceDocument:
        if raw_id is None or str(raw_id).strip() == "":
            return SourceDocument(index, f"#row{index}", None, meta, "missing_id")
        source_id = str(raw_id)
        # The first row with an id is its document, whatever its text: a later row with
        # the same id is rejected as a duplicate (and never shares the document's rows).
        # Ids are remembered as short digests so a large shard stays small in memory.
        digest = hashlib.blake2b(source_id.encode("utf-8", "surrogatepass"), digest_size=12).digest()
        if digest in self._seen_ids:
            return SourceDocument(index, source_id, text if isinstance(text, str) else None, meta, DUPLICATE_ID)
        self._seen_ids.add(digest)
        if isinstance(text, _Undecodable):
            return SourceDocument(index, source_id, None, meta, "invalid_utf8")
        if text is not None and not isinstance(text, str):
            return SourceDocument(index, source_id, None, meta, "text_not_a_string")
        if text is None:
            return SourceDocument(index, source_id, None, meta, "missing_text")
        if not text.strip():
            return SourceDocument(index, source_id, text, meta, "empty_text")
        return SourceDocument(index, source_id, text, meta)


class _Undecodable:
    """Marks a text value whose bytes are not valid UTF-8."""


def _texts_of(column: pa.ChunkedArray | pa.Array) -> list:
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [_decode(value) for value in column.to_pylist()]
    try:
        return column.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        # A string column holding invalid UTF-8: look at each value's bytes.
        return [_decode(value) for value in column.cast(pa.binary()).to_pylist()]


def _decode(value: bytes | None):
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return _Undecodable()


def open_shard(path: Path, source_uri: str, columns: SourceColumns = SourceColumns()) -> ShardReader:
    return ShardReader(path, shard_format(source_uri), columns)
