"""Data-quality gates on shards, run with great_expectations 1.x inside our own code.

Two gates, thresholds from the recipe (`recipe.quality`, `recipe.cleaning`):
- input gate, over the source shard before any LLM call: the id and text columns exist,
  ids are present and unique, texts are present and within the length bounds;
- output gate, over the committed `data/` and `rejected/` files, in three suites:
  `output.rows` (one row per accepted rewrite: lineage, ranges, uniqueness, lengths,
  finish reason, keyword coverage for most rows), `output.documents` (one row per source
  document: every pair accounted for, accepted rewrites per document) and
  `output.shard` (one row: the expansion ratio).

Every expectation carries a short check name (`unique_ids`, `keyword_coverage`, ...) in
its description, so a failure reads the same in the registry, the logs and the Data
Docs HTML. Data Docs are rendered into a temporary folder and then copied under
`{output_root}/{recipe_id}/quality/{shard}/{gate}/` (also on S3).

great_expectations is imported only when a gate runs: an Airflow DAG file that imports
this module still parses in milliseconds. Texts are measured with pyarrow and only
their lengths are handed to GX, which keeps memory near the size of the ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import string
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maga_tasks.errors import MagaError, ShardInputError
from maga_tasks.data.layout import ShardPaths
from maga_tasks.recipe import Recipe
from maga_tasks.data.schema import LINEAGE_COLUMNS
from maga_tasks.data.source import SourceColumns, shard_format
from maga_tasks.data.storage import StorageError, join, storage_for

if TYPE_CHECKING:
    import pandas as pd

    from maga_tasks.engine.shard import ShardResult

log = logging.getLogger(__name__)

DOCS_SITE = "maga_quality"
DEFAULT_COLUMNS = SourceColumns()
# Data Docs pages load bootstrap etc. from CDNs; of GX's static folder they only use
# the styles and the favicon, so the 4 MB of fonts and images are not copied.
_DOCS_SUFFIXES = (".html", ".css", ".ico")
# Output columns measured by GX. `text` is replaced by its length, `text_chars`.
_ROW_COLUMNS = tuple(c for c in LINEAGE_COLUMNS if c != "text") + (
    "keyword_coverage",
    "source_chars",
    "prompt_tokens",
    "completion_tokens",
    "pairs_prompt_tokens",
    "pairs_completion_tokens",
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
)


class QualityError(MagaError):
    """A gate could not run (output files missing or unreadable)."""


# -- reports ---------------------------------------------------------------------------


@dataclass
class QualityReport:
    """Outcome of one gate on one shard; small enough for an XCom."""

    gate: str  # "input" or "output"
    shard: str
    success: bool
    statistics: dict
    failed: list[dict] = field(default_factory=list)  # suite, check, expectation, column, observed
    docs_uri: str | None = None
    labels: dict = field(default_factory=dict)  # output gate: top genres/audiences

    @property
    def failed_names(self) -> list[str]:
        """Readable failures: `check (column): observed`."""
        out = []
        for item in self.failed:
            column = f" ({item['column']})" if item.get("column") else ""
            out.append(f"{item['check']}{column}: {item['observed']}")
        return out

    def reason(self) -> str:
        """One line for a quarantine reason or a log."""
        if self.success:
            return f"{self.gate} quality gate passed"
        return f"{self.gate} quality gate failed: " + "; ".join(self.failed_names)

    def to_dict(self) -> dict:
        return asdict(self)


# -- committed output files ------------------------------------------------------------


@dataclass
class CommittedShard:
    """The committed files of a shard, read once: frames for GX and their checksum."""

    paths: ShardPaths
    rows: pd.DataFrame  # accepted rows; `text` replaced by `text_chars`
    rejected: pd.DataFrame
    checksum: str  # sha256 of the data file bytes followed by the rejected file bytes

    def documents(self) -> pd.DataFrame:
        """One row per source document: accepted, rejected and total rows, its length."""
        import pandas as pd

        keys = ["source_id", "source_chars"]
        both = pd.concat(
            [self.rows.reindex(columns=keys), self.rejected.reindex(columns=keys)], ignore_index=True
        )
        frame = pd.DataFrame(
            {
                "accepted": self.rows.groupby("source_id").size() if "source_id" in self.rows else None,
                "rejected": self.rejected.groupby("source_id").size() if "source_id" in self.rejected else None,
                "source_chars": both.groupby("source_id")["source_chars"].max(),
            }
        )
        frame[["accepted", "rejected"]] = frame[["accepted", "rejected"]].fillna(0).astype("int64")
        frame["rows"] = frame["accepted"] + frame["rejected"]
        return frame.rename_axis("source_id").reset_index()

    def figures(self) -> dict:
        """Shard-level counts measured on the files (what `ShardResult` reports)."""
        docs = self.documents()

        def total(column: str) -> int:
            return sum(int(f[column].fillna(0).sum()) for f in (self.rows, self.rejected) if column in f)

        source_chars = int(docs["source_chars"].fillna(0).sum())
        output_chars = int(self.rows["text_chars"].fillna(0).sum()) if "text_chars" in self.rows else 0
        reasons = self.rejected["reject_reason"].fillna("unknown").value_counts() if len(self.rejected) else {}
        return {
            "documents": len(docs),
            "accepted": len(self.rows),
            "rejected": len(self.rejected),
            "rejects_by_reason": {str(k): int(v) for k, v in dict(reasons).items()},
            "prompt_tokens": total("prompt_tokens") + total("pairs_prompt_tokens"),
            "completion_tokens": total("completion_tokens") + total("pairs_completion_tokens"),
            "source_chars": source_chars,
            "output_chars": output_chars,
            "expansion_ratio": round(output_chars / source_chars, 4) if source_chars else 0.0,
            "accepted_per_document": round(len(self.rows) / len(docs), 4) if len(docs) else 0.0,
        }


def _read_parquet_bytes(data: bytes, uri: str, wanted: tuple[str, ...], keep_text: bool) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise QualityError(f"cannot read committed file {uri}: {error}") from None
    if keep_text and "text" in table.column_names:
        lengths = pc.utf8_length(table.column("text"))
        table = table.append_column("text_chars", lengths)
    return table.select([c for c in wanted if c in table.column_names])


def load_committed(paths: ShardPaths, s3_endpoint_url: str | None = None) -> CommittedShard:
    """Read a shard's committed `data/` and `rejected/` files (each read once)."""
    storage = storage_for(paths.data, s3_endpoint_url)
    missing = [uri for uri in (paths.data, paths.rejected) if not storage.exists(uri)]
    if missing:
        raise QualityError(f"shard {paths.shard} is not committed: missing {', '.join(missing)}")
    try:
        data_bytes = storage.read_bytes(paths.data)
        rejected_bytes = storage.read_bytes(paths.rejected)
    except (StorageError, OSError) as error:
        raise QualityError(f"cannot read shard {paths.shard}: {error}") from None
    digest = hashlib.sha256()
    digest.update(data_bytes)
    digest.update(rejected_bytes)
    rows = _read_parquet_bytes(data_bytes, paths.data, _ROW_COLUMNS + ("text_chars",), keep_text=True)
    rejected = _read_parquet_bytes(rejected_bytes, paths.rejected, _REJECTED_COLUMNS, keep_text=False)
    return CommittedShard(paths, rows.to_pandas(), rejected.to_pandas(), digest.hexdigest())


# -- source shards ---------------------------------------------------------------------


def read_source_frame(
    source_uri: str, columns: SourceColumns = DEFAULT_COLUMNS, s3_endpoint_url: str | None = None
) -> pd.DataFrame:
    """The id and text length of every source row, as columns `{id}` and `{text}_chars`
    (named after the configured columns); a column absent from the file is absent from
    the frame and the gate reports it. Raises `ShardInputError` when the file cannot be
    read at all."""

    fmt = shard_format(source_uri)
    storage = storage_for(source_uri, s3_endpoint_url)
    try:
        with storage.local_copy(source_uri) as path:
            if fmt == "parquet":
                table = _source_parquet(path, columns)
            else:
                table = _source_jsonl(path, fmt, columns)
    except StorageError as error:
        raise ShardInputError(f"cannot read source shard {source_uri}: {error}") from None
    return table.to_pandas()


def _chars(columns: SourceColumns) -> str:
    return f"{columns.text}_chars"


def _source_parquet(path: Path, columns: SourceColumns) -> pa.Table:
    # Batch by batch, so only ids and lengths are kept: memory does not grow with the text.
    try:
        parquet = pq.ParquetFile(path)
        present = [c for c in (columns.id, columns.text) if c in parquet.schema_arrow.names]
        batches = [_id_and_length(batch, columns) for batch in parquet.iter_batches(batch_size=4096, columns=present)]
    except (pa.ArrowException, OSError) as error:
        raise ShardInputError(f"{path.name}: not a readable parquet file ({error})") from None
    if not present:  # neither column: keep the row count so the report still says how many rows there were
        return pa.table({"_row": pa.nulls(parquet.metadata.num_rows, pa.int8())})
    if not batches:
        return _id_and_length(parquet.schema_arrow.empty_table().select(present), columns)
    return pa.concat_tables(batches)


def _id_and_length(batch: pa.RecordBatch | pa.Table, columns: SourceColumns) -> pa.Table:
    out = {}
    if columns.id in batch.schema.names:
        out[columns.id] = batch.column(columns.id)
    if columns.text in batch.schema.names:
        text = batch.column(columns.text)
        if pa.types.is_binary(text.type) or pa.types.is_large_binary(text.type):
            out[_chars(columns)] = pc.binary_length(text)
        else:
            out[_chars(columns)] = pc.utf8_length(text.cast(pa.large_string()))
    return pa.table(out)


def _source_jsonl(path: Path, fmt: str, columns: SourceColumns) -> pa.Table:
    opener = gzip.open if fmt == "jsonl.gz" else open
    ids: list = []
    lengths: list = []
    seen = {"id": False, "text": False}
    try:
        with opener(path, "rb") as handle:
            for line in handle:
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
    except (OSError, EOFError) as error:
        raise ShardInputError(f"{path.name}: cannot read ({error})") from None
    out = {}
    if seen["id"]:
        out[columns.id] = pa.array(ids, pa.string())
    if seen["text"]:
        out[_chars(columns)] = pa.array(lengths, pa.int64())
    return pa.table(out) if out else pa.table({"_row": pa.array([None] * len(ids), pa.int8())})


# -- expectations ----------------------------------------------------------------------


def _expectation(gxe, kind: str, check: str, sentence: str, **kwargs):
    """One expectation labelled with its check name (rendered in Data Docs)."""
    return getattr(gxe, kind)(description=f"{check}: {sentence}", meta={"check": check}, **kwargs)


def input_checks(gxe, recipe: Recipe, columns: SourceColumns = DEFAULT_COLUMNS) -> list:
    """The shard is expandable; the rare bad row within `min_valid_source_share` is left
    to the expansion, which rejects it row by row with its reason."""
    q, chars = recipe.quality, _chars(columns)
    share = q.min_valid_source_share
    valid = f"at least {share:.1%}"
    return [
        _expectation(gxe, "ExpectTableColumnsToMatchSet", "source_columns",
                     f"the shard has the id column {columns.id!r} and the text column {columns.text!r}",
                     column_set=[columns.id, chars], exact_match=False),
        _expectation(gxe, "ExpectTableRowCountToBeBetween", "source_not_empty",
                     "the shard holds at least one document", min_value=1),
        _expectation(gxe, "ExpectColumnValuesToNotBeNull", "source_id_not_null",
                     f"{valid} of documents have an id", column=columns.id, mostly=share),
        _expectation(gxe, "ExpectColumnValuesToBeUnique", "source_id_unique",
                     f"{valid} of document ids are unique within the shard", column=columns.id, mostly=share),
        _expectation(gxe, "ExpectColumnValuesToNotBeNull", "source_text_not_null",
                     f"{valid} of documents have a text", column=chars, mostly=share),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "source_text_length",
                     f"{valid} of texts are {q.min_source_chars}..{q.max_source_chars} characters long",
                     column=chars, min_value=q.min_source_chars, max_value=q.max_source_chars, mostly=share),
    ]


def output_row_checks(gxe, recipe: Recipe, shard: str) -> list:
    q, pairs = recipe.quality, recipe.pairs_per_document
    checks = [
        _expectation(gxe, "ExpectTableColumnsToMatchSet", "output_columns",
                     "the data file has every lineage column",
                     column_set=[c if c != "text" else "text_chars" for c in LINEAGE_COLUMNS], exact_match=False),
    ]
    for column in LINEAGE_COLUMNS:
        checks.append(
            _expectation(gxe, "ExpectColumnValuesToNotBeNull", f"lineage_not_null_{column}",
                         f"every accepted row has a {column}",
                         column="text_chars" if column == "text" else column)
        )
    coverage = recipe.cleaning.min_keyword_coverage
    checks += [
        _expectation(gxe, "ExpectColumnValuesToBeUnique", "unique_ids",
                     "output row ids are unique", column="id"),
        _expectation(gxe, "ExpectCompoundColumnsToBeUnique", "unique_document_pairs",
                     "one accepted row per (source document, pair index)",
                     column_list=["source_id", "pair_index"]),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "pair_index_range",
                     f"pair_index is in [0, {pairs})", column="pair_index", min_value=0, max_value=pairs - 1),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "text_length",
                     f"rewrites are {q.min_text_chars}..{q.max_text_chars} characters long",
                     column="text_chars", min_value=q.min_text_chars, max_value=q.max_text_chars),
        _expectation(gxe, "ExpectColumnValuesToBeInSet", "finish_reason_stop",
                     "every rewrite ended with finish_reason 'stop' (not cut by max_tokens)",
                     column="finish_reason", value_set=["stop"]),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "keyword_coverage",
                     f"keyword coverage >= {coverage} for at least {q.min_coverage_share:.0%} of rows",
                     column="keyword_coverage", min_value=coverage, mostly=q.min_coverage_share),
        _expectation(gxe, "ExpectColumnValuesToBeInSet", "recipe_id_matches",
                     f"every row belongs to recipe {recipe.recipe_id}",
                     column="recipe_id", value_set=[recipe.recipe_id]),
        _expectation(gxe, "ExpectColumnValuesToBeInSet", "source_shard_matches",
                     f"every row comes from shard {shard}", column="source_shard", value_set=[shard]),
    ]
    return checks


def output_document_checks(gxe, recipe: Recipe, result: ShardResult | None) -> list:
    q, pairs = recipe.quality, recipe.pairs_per_document
    checks = [
        _expectation(gxe, "ExpectTableRowCountToBeBetween", "documents_present",
                     "the shard accounts for at least one source document", min_value=1),
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "rows_per_document",
                     f"every document has exactly {pairs} rows across data and rejected (nothing dropped)",
                     column="rows", min_value=pairs, max_value=pairs),
        _expectation(gxe, "ExpectColumnMeanToBeBetween", "accepted_per_document",
                     f"on average at least {q.min_accepted_per_document} accepted rewrites per document",
                     column="accepted", min_value=q.min_accepted_per_document),
    ]
    if result is not None:
        checks.append(
            _expectation(gxe, "ExpectTableRowCountToEqual", "documents_match_result",
                         f"the files hold the {result.documents} documents the expansion reported",
                         value=result.documents)
        )
    return checks


def output_shard_checks(gxe, recipe: Recipe) -> list:
    q = recipe.quality
    return [
        _expectation(gxe, "ExpectColumnValuesToBeBetween", "expansion_ratio",
                     f"accepted output chars / source chars within [{q.min_expansion_ratio}, {q.max_expansion_ratio}]",
                     column="expansion_ratio", min_value=q.min_expansion_ratio, max_value=q.max_expansion_ratio),
    ]


# -- running GX ------------------------------------------------------------------------


def _import_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx, gxe


def _ephemeral_context(gx, site_dir: Path):
    """An in-memory GX context whose only Data Docs site is `site_dir`."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy numbers to Python ones)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return str(value)
    return value


def _short(value: Any, limit: int = 60) -> str:
    value = _plain(value)
    if isinstance(value, float) and math.isnan(value):  # NaN: how pandas shows a missing value
        value = None
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exception_message(info: dict | None) -> str | None:
    if not info:
        return None
    if info.get("raised_exception"):
        return info.get("exception_message") or "raised an exception"
    for nested in info.values():
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return nested.get("exception_message") or "raised an exception"
    return None


def _observed(validation) -> str:
    error = _exception_message(validation.exception_info)
    if error:
        return f"error: {error}"
    result = validation.result or {}
    if "unexpected_count" in result:
        count, total = result.get("unexpected_count") or 0, result.get("element_count") or 0
        share = f" ({100.0 * count / total:.1f}%)" if total else ""
        examples = [_short(item["value"]) for item in (result.get("partial_unexpected_counts") or [])[:3]]
        text = f"{count} of {total} rows unexpected{share}"
        return text + (f", e.g. {', '.join(examples)}" if examples else "")
    if "observed_value" in result:
        observed = _plain(result["observed_value"])
        if isinstance(observed, float):
            observed = round(observed, 4)
        return f"observed {observed}"
    return "failed"


_THRESHOLD_KEYS = ("min_value", "max_value", "mostly", "value_set", "value", "column_set")


def _failure(suite: str, validation) -> dict:
    config = validation.expectation_config
    kwargs = config.kwargs or {}
    column = kwargs.get("column") or (",".join(kwargs["column_list"]) if kwargs.get("column_list") else None)
    return {
        "suite": suite,
        "check": (config.meta or {}).get("check") or config.type,
        "expectation": config.type,
        "column": column,
        "observed": _observed(validation),
        "expected": {k: _plain(kwargs[k]) for k in _THRESHOLD_KEYS if kwargs.get(k) is not None},
    }


def _run_suites(gate: str, shard: str, suites: list[tuple[str, pd.DataFrame, list]], site_dir: Path) -> tuple[dict, list[dict]]:
    """Validate each (name, frame, expectations) and render Data Docs into `site_dir`."""
    gx, _ = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    context = _ephemeral_context(gx, site_dir)
    source = context.data_sources.add_pandas(name=f"{gate}_frames")
    run_id = RunIdentifier(run_name=shard, run_time=datetime.now(UTC))
    counts: Counter = Counter()
    failed: list[dict] = []
    for name, frame, expectations in suites:
        suite_name = f"{gate}.{name}"
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{suite_name}.checkpoint",
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
                result_format="SUMMARY",
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
        for run_result in outcome.run_results.values():
            counts.update({k: v for k, v in run_result.statistics.items() if k != "success_percent"})
            failed.extend(_failure(suite_name, r) for r in run_result.results if not r.success)
    evaluated = counts.get("evaluated_expectations", 0)
    statistics = {
        "evaluated_expectations": evaluated,
        "successful_expectations": counts.get("successful_expectations", 0),
        "unsuccessful_expectations": counts.get("unsuccessful_expectations", 0),
        "success_percent": round(100.0 * counts.get("successful_expectations", 0) / evaluated, 2) if evaluated else None,
        "suites": [f"{gate}.{name}" for name, _, _ in suites],
    }
    return statistics, failed


def _publish_docs(site_dir: Path, target: str, s3_endpoint_url: str | None) -> str:
    """Replace the Data Docs under `target` with the freshly rendered site."""
    storage = storage_for(target, s3_endpoint_url)
    storage.delete_prefix(target)
    for path in sorted(site_dir.rglob("*")):
        if path.is_file() and path.suffix in _DOCS_SUFFIXES:
            storage.put_file(join(target, path.relative_to(site_dir).as_posix()), path)
    return join(target, "index.html")


def _gate(gate: str, paths: ShardPaths, suites: list, s3_endpoint_url: str | None) -> tuple[dict, list, str]:
    with tempfile.TemporaryDirectory(prefix=f"maga-gx-{gate}-") as tmp:
        site_dir = Path(tmp) / "site"
        statistics, failed = _run_suites(gate, paths.shard, suites, site_dir)
        docs_uri = _publish_docs(site_dir, join(paths.quality_docs, gate), s3_endpoint_url)
    return statistics, failed, docs_uri


# -- the gates -------------------------------------------------------------------------


def validate_input(
    source_uri: str,
    recipe: Recipe,
    paths: ShardPaths,
    *,
    columns: SourceColumns = DEFAULT_COLUMNS,
    s3_endpoint_url: str | None = None,
) -> QualityReport:
    """Input gate over a source shard. Raises `ShardInputError` if it cannot be read."""
    frame = read_source_frame(source_uri, columns, s3_endpoint_url)
    _, gxe = _import_gx()
    statistics, failed, docs_uri = _gate(
        "input", paths, [("source", frame, input_checks(gxe, recipe, columns))], s3_endpoint_url
    )
    statistics["documents"] = len(frame)
    report = QualityReport("input", paths.shard, not failed, statistics, failed, docs_uri)
    _log_report(report)
    return report


def validate_output(
    committed: CommittedShard,
    recipe: Recipe,
    *,
    result: ShardResult | None = None,
    s3_endpoint_url: str | None = None,
) -> QualityReport:
    """Output gate over a committed shard (`load_committed`). With the `ShardResult` of
    the expansion, the files must also hold the documents it reported."""
    import pandas as pd

    _, gxe = _import_gx()
    paths = committed.paths
    figures = committed.figures()
    shard_frame = pd.DataFrame(
        [{"expansion_ratio": figures["expansion_ratio"], "accepted_per_document": figures["accepted_per_document"]}]
    )
    suites = [
        ("rows", committed.rows, output_row_checks(gxe, recipe, paths.shard)),
        ("documents", committed.documents(), output_document_checks(gxe, recipe, result)),
        ("shard", shard_frame, output_shard_checks(gxe, recipe)),
    ]
    statistics, failed, docs_uri = _gate("output", paths, suites, s3_endpoint_url)
    statistics["figures"] = figures
    statistics["checksum"] = committed.checksum
    if result is not None:
        statistics["result_expansion_ratio"] = result.expansion_ratio
    report = QualityReport(
        "output", paths.shard, not failed, statistics, failed, docs_uri, label_summary(committed.rows)
    )
    _log_report(report)
    return report


def _log_report(report: QualityReport) -> None:
    stats = report.statistics
    if report.success:
        log.info(
            "quality %s %s: passed %s/%s expectations; docs %s",
            report.gate, report.shard, stats["successful_expectations"], stats["evaluated_expectations"],
            report.docs_uri,
        )
    else:
        log.warning(
            "quality %s %s: FAILED %s of %s expectations: %s; docs %s",
            report.gate, report.shard, stats["unsuccessful_expectations"], stats["evaluated_expectations"],
            "; ".join(report.failed_names), report.docs_uri,
        )


# -- genre / audience summary ------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")
_CLAUSE_END = re.compile(r"[.,;:!?\n(]|\s[-\u2013\u2014]\s")
_ARTICLES = {"a", "an", "the"}


def short_label(description: str | None, words: int = 6) -> str:
    """A genre or audience description cut to its opening words, for counting:
    'A step-by-step tutorial, friendly in tone...' -> 'step-by-step tutorial'."""
    if not description or not description.strip():
        return "(none)"
    first = _CLAUSE_END.split(description.strip().lstrip(string.punctuation + " "), maxsplit=1)[0]
    tokens = _WORD.findall(first.lower())
    while tokens and tokens[0] in _ARTICLES:
        tokens.pop(0)
    return " ".join(tokens[:words]) or "(none)"


def label_summary(rows: pd.DataFrame, top: int = 10) -> dict:
    """Top genre and audience labels of a shard's accepted rows, for the registry."""
    out: dict[str, Any] = {"rows": len(rows)}
    for column, key in (("genre", "genres"), ("audience", "audiences")):
        if column not in rows or not len(rows):
            out[key], out[f"distinct_{key}"] = [], 0
            continue
        labels = Counter(short_label(value if isinstance(value, str) else None) for value in rows[column])
        out[key] = [[label, count] for label, count in labels.most_common(top)]
        out[f"distinct_{key}"] = len(labels)
    if "pair_index" in rows and len(rows):
        out["pair_index"] = {str(k): int(v) for k, v in sorted(rows["pair_index"].value_counts().items())}
    return out


__all__ = [
    "CommittedShard",
    "QualityError",
    "QualityReport",
    "label_summary",
    "load_committed",
    "read_source_frame",
    "short_label",
    "validate_input",
    "validate_output",
]
