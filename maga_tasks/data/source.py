"""Source shards: listing them and streaming their documents with bounded memory.

A shard is one parquet, jsonl or jsonl.gz file. Source files, their names and their rows
are untrusted: rows that cannot be used (no id, no text, text that is not UTF-8, a
repeated id, a line that is not a JSON object or is nested too deeply, a line over
`SourceLimits.line_bytes`, a text over `max_source_chars`) are still yielded, marked with
the reason and a detail, so that they end up in the rejected output instead of failing
the shard or disappearing. A jsonl line is read in bounded pieces: one over the bound is
skipped to its newline without being held whole (a decompression bomb stays small). A
file-level fault (a parquet text column that is not text, a corrupt file) is one
`ShardInputError`. A local folder's links that lead out of it are refused when listing.

A reader reads one open file for all its passes and its identity (`ShardReader.identity`,
the sha256 of its bytes): what the checkpoint is bound to (`data.checkpoint`).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maga_tasks.data.schema import DUPLICATE_ID
from maga_tasks.data.storage import StorageError, is_s3, storage_for
from maga_tasks.errors import ShardInputError
from maga_tasks.redaction import strip_control
from maga_tasks.reject_reasons import RejectReason

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")
# Room in a jsonl line beyond 4 bytes per character of its text (UTF-8's widest): the
# id, the keys and the other columns of the row.
LINE_SLACK_BYTES = 1 << 20
# Deepest JSON nesting a jsonl row may have. A row is a flat record; the bound keeps the
# parse, and every later dump of its other columns, far from Python's recursion limit,
# so a row is rejected the same way on every pass whatever the stack depth.
MAX_JSON_DEPTH = 64
# The longest source id kept; a longer one is rejected (`id_too_long`): an id is copied
# into every output row.
MAX_ID_CHARS = 1024
# The piece in which the rest of an over-long line is skipped.
_SKIP_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceColumns:
    id: str = "id"
    text: str = "text"


DEFAULT_COLUMNS = SourceColumns()  # frozen, so one instance can be every call's default

@dataclass(frozen=True)
class SourceLimits:
    """Bounds on what one source row may weigh, checked while reading."""

    max_source_chars: int = 2_000_000  # the recipe's `quality.max_source_chars`
    max_line_bytes: int | None = None  # a jsonl line; None: 4 x max_source_chars + LINE_SLACK_BYTES

    @property
    def line_bytes(self) -> int:
        return self.max_line_bytes or 4 * self.max_source_chars + LINE_SLACK_BYTES


@dataclass
class SourceDocument:
    index: int  # position in the shard, the order of the output
    source_id: str
    text: str | None
    meta: dict = field(default_factory=dict)
    problem: str | None = None  # why it is rejected before any LLM call
    detail: str | None = None  # what exactly was wrong, for the rejected rows


def shown(name: str) -> str:
    """An untrusted file name fit for one log or error line: control characters (terminal
    escapes among them) and newlines shown, not kept."""
    return strip_control(name).replace("\n", "\\n")


def list_source_shards(source_uri: str, s3_endpoint_url: str | None = None) -> list[str]:
    """Sorted shard files under a directory or prefix, or the file itself.

    In a local folder a link whose target lies outside the folder is refused (one warning
    each, skipped): listing a folder never reaches files beyond it."""
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
    shards = [
        uri
        for uri in found
        if uri.endswith(SHARD_SUFFIXES) and "/_" not in uri[len(prefix):] and "/." not in uri[len(prefix):]
    ]
    return shards if is_s3(source_uri) else _inside(Path(source_uri), shards)


def _inside(root: Path, uris: list[str]) -> list[str]:
    real_root = root.resolve()
    kept = []
    for uri in uris:
        if Path(uri).resolve().is_relative_to(real_root):
            kept.append(uri)
        else:
            log.warning("source %s links out of the source folder %s; refused, not read", shown(uri), shown(str(root)))
    return kept


def shard_format(uri: str) -> str:
    for suffix in SHARD_SUFFIXES:
        if uri.endswith(suffix):
            return suffix.lstrip(".")
    raise ShardInputError(f"unsupported shard format (want {', '.join(SHARD_SUFFIXES)}): {shown(uri)}")


def measure_source(
    path: Path, fmt: str, columns: SourceColumns, length_column: str, limits: SourceLimits = SourceLimits()
) -> pa.Table:
    """The id and text length of every row of a local shard file, as columns `{id}`
    and `length_column`, read batch by batch so no text is kept (for the input gate).
    Rows stay as they are (a missing id is null; so is a jsonl line that is no usable
    record); a column absent from the file is absent from the table, and a file with
    neither column keeps its row count."""
    with open_source_file(path) as file:
        if fmt == "parquet":
            return _measure_parquet(file, path.name, columns, length_column)
        return _measure_jsonl(file, path.name, fmt, columns, length_column, limits)


def open_source_file(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:
        raise ShardInputError(f"{shown(path.name)}: cannot read ({error.strerror})") from None


def _measure_parquet(file: BinaryIO, name: str, columns: SourceColumns, length_column: str) -> pa.Table:
    parquet = _open_parquet(file, name)
    _check_text_type(parquet.schema_arrow, columns, name)
    present = [c for c in (columns.id, columns.text) if c in parquet.schema_arrow.names]
    if not present:  # neither column: keep the row count so the report still says how many rows there were
        return pa.table({"_row": pa.nulls(parquet.metadata.num_rows, pa.int8())})
    try:
        batches = [
            _id_and_length(batch, columns, length_column)
            for batch in parquet.iter_batches(batch_size=4096, columns=present)
        ]
        if not batches:
            return _id_and_length(parquet.schema_arrow.empty_table().select(present), columns, length_column)
    except (pa.ArrowException, OSError) as error:
        raise ShardInputError(f"{shown(name)}: not a readable parquet file ({error})") from None
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


def _check_text_type(schema: pa.Schema, columns: SourceColumns, name: str) -> None:
    """A parquet text column must hold text (or bytes, checked row by row as UTF-8):
    a column of lists or numbers is a file that is not a source shard."""
    if columns.text not in schema.names:
        return
    kind = schema.field(columns.text).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_null(kind)):
        raise ShardInputError(f"{shown(name)}: the text column {columns.text!r} holds {kind}, not text")


def _measure_jsonl(
    file: BinaryIO, name: str, fmt: str, columns: SourceColumns, length_column: str, limits: SourceLimits
) -> pa.Table:
    ids: list = []
    lengths: list = []
    seen = {"id": False, "text": False}
    for line in _jsonl_lines(file, fmt, limits.line_bytes, name):
        if _is_blank(line):
            continue
        record, _, _ = _parse_line(line, limits)
        if record is None:
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


def _open_parquet(file: BinaryIO, name: str) -> pq.ParquetFile:
    # Not pre-buffered: a row group's texts are read as they are decoded, batch by
    # batch, so a shard written as one big row group does not land in memory whole.
    try:
        return pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as error:
        raise ShardInputError(f"{shown(name)}: not a readable parquet file ({error})") from None


# -- jsonl lines -------------------------------------------------------------------------


@dataclass(frozen=True)
class _LongLine:
    """A jsonl line over the bound, skipped to its newline: only its size is kept."""

    size: int


def _jsonl_lines(file: BinaryIO, fmt: str, max_bytes: int, name: str) -> Iterator[bytes | _LongLine]:
    """The lines of a jsonl(.gz) file from its start, each read in at most `max_bytes`
    (+1) bytes: a longer line becomes a `_LongLine`, its rest skipped in 1 MiB pieces, so
    no line past the bound is ever held (gzip is decompressed piece by piece too)."""
    file.seek(0)
    stream = gzip.GzipFile(fileobj=file, mode="rb") if fmt == "jsonl.gz" else file
    first = True
    try:
        while line := stream.readline(max_bytes + 1):
            if first:  # a byte order mark some writers put first is not part of the row
                line, first = line.removeprefix(codecs.BOM_UTF8), False
            if len(line) > max_bytes and not line.endswith(b"\n"):
                size = len(line)
                while rest := stream.readline(_SKIP_CHUNK):
                    size += len(rest)
                    if rest.endswith(b"\n"):
                        break
                yield _LongLine(size)
            else:
                yield line
    except (OSError, EOFError, zlib.error) as error:
        raise ShardInputError(f"{shown(name)}: cannot read ({error})") from None


def _is_blank(line: bytes | _LongLine) -> bool:
    return not isinstance(line, _LongLine) and not line.strip()


def _parse_line(line: bytes | _LongLine, limits: SourceLimits) -> tuple[dict | None, str | None, str | None]:
    """`(record, None, None)` for a line holding a JSON object, else `(None, reason, detail)`."""
    if isinstance(line, _LongLine):
        detail = f"a line of {line.size:,} bytes, over max_line_bytes {limits.line_bytes:,}"
        return None, RejectReason.LINE_TOO_LONG, detail
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, RejectReason.INVALID_UTF8, f"the line is not UTF-8 (byte {error.start})"
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as error:
        return None, RejectReason.INVALID_JSON_LINE, f"not JSON: {error.msg} (column {error.colno})"
    except RecursionError:
        return None, RejectReason.INVALID_JSON_LINE, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    if not isinstance(record, dict):
        return None, RejectReason.INVALID_JSON_LINE, f"a JSON {type(record).__name__}, not an object"
    # Counting brackets is C-fast; only a line with many of them is walked.
    if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH and _deeper_than(record, MAX_JSON_DEPTH):
        return None, RejectReason.INVALID_JSON_LINE, f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    return record, None, None


def _deeper_than(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


# -- the reader ----------------------------------------------------------------------------


class ShardReader:
    """Reads one local shard file in batches; validates the columns on open.

    The file is opened once: its identity and every pass over it (count, expansion,
    commit, one after another) read that one open file, so a new file put in its place
    meanwhile cannot slip into the run. Close it (or use it as a context manager)."""

    def __init__(
        self, path: Path, fmt: str, columns: SourceColumns = SourceColumns(), batch_size: int = 256,
        limits: SourceLimits = SourceLimits(),
    ):
        self.path = Path(path)
        self.fmt = fmt
        self.columns = columns
        self.batch_size = batch_size
        self.limits = limits
        self._seen_ids: set[bytes] = set()
        self._file = open_source_file(self.path)
        if fmt == "parquet":
            try:
                self._parquet = _open_parquet(self._file, self.path.name)
                names = self._parquet.schema_arrow.names
                missing = [c for c in (columns.id, columns.text) if c not in names]
                if missing:
                    raise ShardInputError(f"{shown(self.path.name)}: missing column(s) {missing}; found {names}")
                _check_text_type(self._parquet.schema_arrow, columns, self.path.name)
            except ShardInputError:
                self._file.close()
                raise

    def identity(self) -> str:
        """`sha256:{hex}` of the file's bytes (0.06 s per 100 MB here): which version of
        the source this reader reads."""
        self._file.seek(0)
        return "sha256:" + hashlib.file_digest(self._file, "sha256").hexdigest()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count(self) -> int:
        if self.fmt == "parquet":
            return self._parquet.metadata.num_rows
        return sum(1 for line in self._jsonl_lines() if not _is_blank(line))

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
                for row, (raw_id, text) in enumerate(zip(ids, texts, strict=True)):
                    meta = {n: other_values[n][row] for n in others}
                    yield self._document(index, raw_id, text, meta)
                    index += 1
        except (pa.ArrowException, OSError) as error:
            raise ShardInputError(
                f"{shown(self.path.name)}: corrupt parquet data after row {index} ({error})"
            ) from None

    # -- jsonl -----------------------------------------------------------------------

    def _jsonl_lines(self) -> Iterator[bytes | _LongLine]:
        return _jsonl_lines(self._file, self.fmt, self.limits.line_bytes, self.path.name)

    def _iter_jsonl(self) -> Iterator[SourceDocument]:
        index = 0
        for line in self._jsonl_lines():
            if _is_blank(line):
                continue
            record, problem, detail = _parse_line(line, self.limits)
            if record is None:
                yield SourceDocument(index, f"#row{index}", None, {}, problem, detail)
            else:
                raw_id = record.pop(self.columns.id, None)
                text = record.pop(self.columns.text, None)
                yield self._document(index, raw_id, text, record)
            index += 1

    # -- shared ----------------------------------------------------------------------

    def _document(self, index: int, raw_id, text, meta: dict) -> SourceDocument:
        if raw_id is None or str(raw_id).strip() == "":
            return SourceDocument(index, f"#row{index}", None, meta, RejectReason.MISSING_ID)
        source_id = str(raw_id)
        if len(source_id) > MAX_ID_CHARS:
            return SourceDocument(
                index, f"#row{index}", None, meta, RejectReason.ID_TOO_LONG, f"an id of {len(source_id):,} characters"
            )
        # The first row with an id is its document, whatever its text: a later row with
        # the same id is rejected as a duplicate (and never shares the document's rows).
        # Ids are remembered as short digests so a large shard stays small in memory.
        digest = hashlib.blake2b(source_id.encode("utf-8", "surrogatepass"), digest_size=12).digest()
        if digest in self._seen_ids:
            return SourceDocument(index, source_id, text if isinstance(text, str) else None, meta, DUPLICATE_ID)
        self._seen_ids.add(digest)
        if isinstance(text, _Undecodable):
            return SourceDocument(
                index, source_id, None, meta, RejectReason.INVALID_UTF8, f"the text is not UTF-8 (byte {text.start})"
            )
        if text is not None and not isinstance(text, str):
            return SourceDocument(
                index, source_id, None, meta, RejectReason.TEXT_NOT_A_STRING, f"a {type(text).__name__}"
            )
        if text is None:
            return SourceDocument(index, source_id, None, meta, RejectReason.MISSING_TEXT)
        if not text.strip():
            return SourceDocument(index, source_id, text, meta, RejectReason.EMPTY_TEXT)
        if len(text) > self.limits.max_source_chars:
            # Rejected, its text not kept: it counts no source characters for the shard.
            return SourceDocument(
                index, source_id, None, meta, RejectReason.TEXT_TOO_LONG,
                f"{len(text):,} characters, over max_source_chars {self.limits.max_source_chars:,}",
            )
        return SourceDocument(index, source_id, text, meta)



@dataclass(frozen=True)
class _Undecodable:
    """Marks a text value whose bytes are not valid UTF-8 (`start`: the first bad byte)."""

    start: int


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
    except UnicodeDecodeError as error:
        return _Undecodable(error.start)


def open_shard(
    path: Path, source_uri: str, columns: SourceColumns = SourceColumns(), limits: SourceLimits = SourceLimits()
) -> ShardReader:
    return ShardReader(path, shard_format(source_uri), columns, limits=limits)
