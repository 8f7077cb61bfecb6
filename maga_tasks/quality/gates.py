"""The data-quality gates on shards, run with great_expectations 1.x inside our own code.

Two gates, thresholds from the recipe (`recipe.quality`, `recipe.cleaning`):
- input gate, over the source shard before any LLM call: the id and text columns exist,
  ids are present and unique, texts are present and within the length bounds;
- output gate, over the committed `data/` and `rejected/` files, in three suites:
  `output.rows` (one row per accepted rewrite: lineage, ranges, uniqueness, lengths,
  finish reason, keyword coverage for most rows), `output.documents` (one row per source
  document: every pair accounted for, accepted rewrites per document) and
  `output.shard` (one row: the expansion ratio).

Each gate writes a compact JSON result for every shard and a Data Docs site only for a
failed or sampled shard (`datadocs.run_gate`); the report's `docs_uri` is what exists.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from maga_tasks.data.layout import ShardPaths
from maga_tasks.data.source import SourceColumns
from maga_tasks.quality.datadocs import DATA_DOCS_SAMPLE_RATE, GateRun, import_gx, run_gate
from maga_tasks.quality.frames import DEFAULT_COLUMNS, CommittedShard, QualityError, read_source_frame
from maga_tasks.quality.suites import input_checks, output_document_checks, output_row_checks, output_shard_checks
from maga_tasks.recipe import Recipe

if TYPE_CHECKING:
    from maga_tasks.data.figures import ShardFigures

log = logging.getLogger(__name__)


# -- reports ---------------------------------------------------------------------------


@dataclass
class QualityReport:
    """Outcome of one gate on one shard; small enough for an XCom."""

    gate: str  # "input" or "output"
    shard: str
    success: bool
    statistics: dict
    failed: list[dict] = field(default_factory=list)  # suite, check, expectation, column, observed
    docs_uri: str | None = None  # what exists to read: the Data Docs index, else `result_uri`
    labels: dict = field(default_factory=dict)  # output gate: top genres/audiences
    result_uri: str | None = None  # the compact JSON result (every shard)
    data_docs_uri: str | None = None  # the Data Docs index (failed and sampled shards only)

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


# -- the gates -------------------------------------------------------------------------


def validate_input(
    source_uri: str,
    recipe: Recipe,
    paths: ShardPaths,
    *,
    columns: SourceColumns = DEFAULT_COLUMNS,
    s3_endpoint_url: str | None = None,
    data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE,
) -> QualityReport:
    """Input gate over a source shard. Raises `ShardInputError` if it cannot be read."""
    frame = read_source_frame(source_uri, columns, s3_endpoint_url)
    _, gxe = import_gx()
    run = run_gate(
        "input", paths, [("source", frame, input_checks(gxe, recipe, columns))], s3_endpoint_url,
        data_docs_sample_rate=data_docs_sample_rate, facts={"documents": len(frame)},
    )
    report = _report("input", paths, run)
    _log_report(report)
    return report


def validate_output(
    committed: CommittedShard,
    recipe: Recipe,
    *,
    result: ShardFigures | None = None,
    s3_endpoint_url: str | None = None,
    data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE,
) -> QualityReport:
    """Output gate over a committed shard (`load_committed`). With the `ShardResult` of
    the expansion (or other figures), the files must also hold the documents it reported."""
    import pandas as pd

    _, gxe = import_gx()
    paths, figures = committed.paths, committed.figures
    shard_frame = pd.DataFrame(
        [{"expansion_ratio": figures.expansion_ratio, "accepted_per_document": figures.accepted_per_document}]
    )
    suites = [
        ("rows", committed.rows, output_row_checks(gxe, recipe, paths.shard)),
        ("documents", committed.documents(), output_document_checks(gxe, recipe, result)),
        ("shard", shard_frame, output_shard_checks(gxe, recipe)),
    ]
    facts = {"figures": figures.to_dict(), "checksum": committed.checksum}
    if result is not None:
        facts["result_expansion_ratio"] = result.expansion_ratio
    run = run_gate("output", paths, suites, s3_endpoint_url, data_docs_sample_rate=data_docs_sample_rate, facts=facts)
    report = _report("output", paths, run, committed.labels)
    _log_report(report)
    return report


def _report(gate: str, paths: ShardPaths, run: GateRun, labels: dict | None = None) -> QualityReport:
    return QualityReport(
        gate, paths.shard, not run.failed, run.statistics, run.failed, run.docs_uri, labels or {},
        result_uri=run.result_uri, data_docs_uri=run.data_docs_uri,
    )


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


__all__ = ["QualityError", "QualityReport", "validate_input", "validate_output"]
