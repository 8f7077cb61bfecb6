"""A trial run of one shard: its first documents expanded beside the corpus and put
through both gates, with nothing leased, registered or quarantined (`maga publish-shard
--max-docs`, the DAG's `max_docs_per_shard`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from maga_tasks.data.layout import trial_root
from maga_tasks.data.outcome import ShardOutcome, summary_figures
from maga_tasks.data.source import DEFAULT_COLUMNS, SourceColumns
from maga_tasks.engine.job import ShardJob, reading_source_once
from maga_tasks.engine.shard import expand
from maga_tasks.errors import ShardInputError
from maga_tasks.recipe import Recipe
from maga_tasks.settings import RunSettings

log = logging.getLogger(__name__)


@reading_source_once
def trial_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    *,
    max_docs: int,
    shard: str | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS,
    progress: Callable[[dict], None] | None = None,
    check_input: bool = True,
) -> dict:
    """A trial run: the first `max_docs` documents expanded under `trial_root` and put
    through both gates, with nothing leased, registered or quarantined, so a later full
    run still plans and publishes the whole shard. The summary's status is "trial";
    `quality_success` tells whether the gates passed."""
    job = ShardJob.of(
        source_uri, trial_root(output_root, max_docs), recipe, shard=shard, columns=columns, settings=settings
    )
    return _trial(job, settings, max_docs=max_docs, progress=progress, check_input=check_input).to_dict()


def _trial(
    job: ShardJob,
    settings: RunSettings,
    *,
    max_docs: int,
    progress: Callable[[dict], None] | None,
    check_input: bool,
) -> ShardOutcome:
    paths, source_uri = job.paths, job.source_uri
    trial = {"max_docs": max_docs}
    try:
        if check_input:
            report = job.input_gate()
            if not report.success:
                return ShardOutcome.of(
                    paths, source_uri, "trial", **trial, quality_success=False, docs_uri=report.docs_uri,
                    failed_expectations=report.failed_names, reason=report.reason(),
                )
        result = expand(job, settings, max_docs=max_docs, progress=progress)
    except ShardInputError as error:
        reason = f"unusable source shard: {error}"
        return ShardOutcome.of(
            paths, source_uri, "trial", **trial, quality_success=False, failed_expectations=[], reason=reason
        )
    report = job.output_gate(job.load_committed(), result)
    log.info(
        "trial of shard %s (first %d documents): %d accepted, %d rejected, gates %s;"
        " nothing registered, outputs under %s",
        paths.shard, max_docs, result.accepted, result.rejected, "passed" if report.success else "failed",
        paths.version_root,
    )
    return ShardOutcome.of(
        paths, source_uri, "trial", **trial, **summary_figures(result),
        docs_uri=report.docs_uri,
        quality_success=report.success,
        failed_expectations=report.failed_names,
        already_committed=result.already_committed,
    )


__all__ = ["trial_shard"]
