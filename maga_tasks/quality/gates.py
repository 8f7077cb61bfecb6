"""The data-quality gates on shards, run with great_expectations 1.x inside our own code.

Two gates, thresholds from the recipe (`recipe.quality`, `recipe.cleaning`):
- input gate, over the source shard before any LLM call: the id and text columns exist,
  ids are present and unique, texts are present and within the length bounds;
- output gate, over the committed `data/` and `rejected/` files, in three suites:
  `output.rows` (one row per accepted rewrite: lineage, ranges, uniqueness, lengths,
  finish reason, keyword coverage for most rows), `output.documents` (one row per source
  document: every pair accounted for, accepted rewrites per document) and
  `output.shard` (one row: the expansion ratio).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from maga_tasks.data.layout import ShardPaths
from maga_tasks.data.source import SourceColumns
from maga_tasks.quality.datadocs import import_gx, run_gate
from maga_tasks.quality.frames import DEFAULT_COLUMNS, CommittedShard, QualityError, read_source_frame
from maga_tasks.quality.labels import label_summary
from maga_tasks.quality.suites import input_checks, output_document_checks, output_row_checks, output_shard_checks
from maga_tasks.recipe import Recipe

if TYPE_CHECKING:
    from maga_tasks.engine.figures import ShardFigures

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
    _, gxe = import_gx()
    statistics, failed, docs_uri = run_gate(
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
    result: ShardFigures | None = None,
    s3_endpoint_url: str | None = None,
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
    statistics, failed, docs_uri = run_gate("output", paths, suites, s3_endpoint_url)
    statistics["figures"] = figures.to_dict()
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


__all__ = ["QualityError", "QualityReport", "validate_input", "validate_output"]
