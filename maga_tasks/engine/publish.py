"""Publishing one shard, exactly once: lease -> input gate -> expand -> output gate ->
register | quarantine.

Every step is safe to repeat. A registered shard returns at once (no LLM request, no
file read). A crash after the commit and before the registration is healed by the next
call: it finds the committed files, skips the input gate and the expansion (no LLM
request), and runs the output gate and the registration again. A quarantined shard stays so until someone asks
for it again with `force=True` (after fixing the source, or deleting the output to have
it expanded anew).

Two kinds of failure, as everywhere: a bad shard (unreadable source, failed gate) is
quarantined and the call returns normally; a server-level failure (every LLM endpoint
down) marks the shard failed, frees the lease and re-raises for the scheduler's retries.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from maga_tasks.errors import EndpointsUnavailable, ShardInputError
from maga_tasks.data.layout import ShardPaths, shard_name, shard_paths, trial_root
from maga_tasks.quality import (
    DEFAULT_COLUMNS,
    CommittedShard,
    QualityReport,
    load_committed,
    validate_input,
    validate_output,
)
from maga_tasks.recipe import Recipe
from maga_tasks.registry import Registry, RegistryError, ShardBusy
from maga_tasks.settings import RunSettings
from maga_tasks.engine.shard import ShardResult, expand_shard
from maga_tasks.data.source import SourceColumns
from maga_tasks.data.storage import StorageError, storage_for

if TYPE_CHECKING:
    from maga_tasks.method.judging import JudgeReport

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 900.0


def default_owner() -> str:
    """A lease owner naming this process: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


# The figures a summary carries, named as on `ShardResult` and in the registry's rows.
_SUMMARY_FIGURES = ("documents", "accepted", "rejected", "prompt_tokens", "completion_tokens", "expansion_ratio")


def _summary_figures(result: ShardResult) -> dict:
    return {name: getattr(result, name) for name in _SUMMARY_FIGURES}


def _summary(paths: ShardPaths, source_uri: str, status: str, **extra) -> dict:
    out = {
        "shard": paths.shard,
        "source_uri": source_uri,
        "recipe_id": paths.recipe_id,
        "status": status,
        "data_uri": paths.data,
        "rejected_uri": paths.rejected,
    }
    out.update(extra)
    return out


def _summary_from_row(paths: ShardPaths, row: dict) -> dict:
    """The XCom of a shard already decided in the registry (registered/quarantined)."""
    return _summary(
        paths,
        row["source_uri"],
        row["status"],
        **{name: row[name] for name in _SUMMARY_FIGURES},
        checksum=row["checksum"],
        docs_uri=row["docs_uri"],
        quality_success=row["status"] == "registered",
        failed_expectations=[_failure_name(f) for f in row.get("failed_expectations") or []],
        reason=row["last_error"],
        skipped=True,
    )


def _failure_name(item: dict | str) -> str:
    if isinstance(item, str):
        return item
    column = f" ({item['column']})" if item.get("column") else ""
    return f"{item.get('check')}{column}: {item.get('observed')}"


def result_from_committed(committed: CommittedShard, source_uri: str) -> ShardResult:
    """The ShardResult of committed files (when no expansion ran in this process)."""
    return ShardResult.of(committed.paths, source_uri, committed.figures, already_committed=True)


def _record(registry: Registry, report: QualityReport, recipe_id: str) -> None:
    registry.record_quality(
        recipe_id, report.shard, report.gate, report.success, report.statistics, report.failed, report.docs_uri
    )


def check_committed_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    *,
    shard: str | None = None,
    registry: Registry | None = None,
    s3_endpoint_url: str | None = None,
) -> QualityReport:
    """Run the output gate on a committed shard without changing its status (the
    result is recorded when a registry is given). For `maga validate-shard`."""
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    committed = load_committed(paths, s3_endpoint_url)
    report = validate_output(committed, recipe, s3_endpoint_url=s3_endpoint_url)
    if registry is not None:
        registry.ensure_recipe(recipe)
        _record(registry, report, recipe.recipe_id)
    return report


def register_committed_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    registry: Registry,
    *,
    shard: str | None = None,
    result: ShardResult | None = None,
    owner: str | None = None,
    s3_endpoint_url: str | None = None,
) -> dict:
    """Output gate on committed files, then register (passed) or quarantine (failed).

    Idempotent: the same files again leave the registry unchanged; other files for a
    registered shard raise `RegistryConflict`. For `maga register-shard` and the last
    step of `publish_shard` (which holds the lease as `owner`)."""
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    registry.ensure_recipe(recipe)
    committed = load_committed(paths, s3_endpoint_url)
    if result is None:
        result = result_from_committed(committed, source_uri)
    report = validate_output(committed, recipe, result=result, s3_endpoint_url=s3_endpoint_url)
    _record(registry, report, recipe.recipe_id)
    summary = _summary(
        paths,
        source_uri,
        "registered",
        **_summary_figures(result),
        checksum=committed.checksum,
        docs_uri=report.docs_uri,
        quality_success=report.success,
        failed_expectations=report.failed_names,
        already_committed=result.already_committed,
        seconds=result.seconds,
        requests=result.requests,
        resumed_documents=result.resumed_documents,
    )
    if not report.success:
        registry.quarantine(
            recipe.recipe_id,
            paths.shard,
            report.reason(),
            report.failed,
            result=result,
            checksum=committed.checksum,
            docs_uri=report.docs_uri,
        )
        return summary | {"status": "quarantined", "reason": report.reason()}
    if owner is not None:
        registry.progress(recipe.recipe_id, paths.shard, owner, status="validated")
    newly = registry.register(
        recipe.recipe_id,
        paths.shard,
        result,
        committed.checksum,
        docs_uri=report.docs_uri,
        label_summary=report.labels,
    )
    log.info(
        "shard %s %s: %d docs, %d accepted, %d rejected, x%.2f expansion, checksum %s",
        paths.shard, "registered" if newly else "was already registered", result.documents,
        result.accepted, result.rejected, result.expansion_ratio, committed.checksum[:12],
    )
    return summary | {"newly_registered": newly}


class _Heartbeat:
    """Progress callback for `expand_shard`: stores the report and extends the lease."""

    def __init__(self, registry: Registry, recipe_id: str, shard: str, owner: str, ttl_s: float, forward):
        self.registry, self.recipe_id, self.shard = registry, recipe_id, shard
        self.owner, self.ttl_s, self.forward = owner, ttl_s, forward
        self.lost = False

    def __call__(self, snapshot: dict) -> None:
        counters = dict(snapshot)
        counters.setdefault("documents", snapshot.get("documents_done", 0))
        held = self.registry.progress(self.recipe_id, self.shard, self.owner, counters=counters, ttl_s=self.ttl_s)
        if not held and not self.lost:
            # Not raised: expand_shard calls this from its event loop. The registration
            # at the end is still exactly-once (checksums), so carry on and say so.
            self.lost = True
            log.warning("shard %s: lease of %s expired and was taken over", self.shard, self.owner)
        if self.forward is not None:
            self.forward(snapshot)


def publish_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    registry: Registry,
    *,
    owner: str,
    shard: str | None = None,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    max_docs: int | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS,
    progress: Callable[[dict], None] | None = None,
    force: bool = False,
    check_input: bool = True,
    judge_sample: int = 0,
) -> dict:
    """Publish one source shard under `recipe`; returns a small summary for an XCom
    (shard, status, counts, URIs, quality outcome, failed expectations).

    With `judge_sample` > 0 a newly registered shard also gets the judge's measurement
    over that many rewrites (`judge_shard_after_publish`).

    `shard` defaults to the source file's name (dated planning passes its own).
    With `max_docs` it is a `trial_shard` instead: nothing is leased or registered.
    Raises `ShardBusy` when another live worker holds the lease (the task retries
    later), `EndpointsUnavailable` after marking the shard failed, and
    `RegistryConflict` if a registered shard would get different content.
    """
    if max_docs is not None:
        return trial_shard(
            source_uri, output_root, recipe, settings, max_docs=max_docs, shard=shard, columns=columns,
            progress=progress, check_input=check_input,
        )
    s3 = settings.s3_endpoint_url
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    rid = recipe.recipe_id
    registry.ensure_recipe(recipe)

    row = registry.shard(rid, paths.shard)
    if row is not None and row["status"] == "registered":
        log.info("shard %s already registered (checksum %s); nothing to do", paths.shard, (row["checksum"] or "")[:12])
        return _summary_from_row(paths, row)
    if row is not None and row["status"] == "quarantined" and not force:
        log.warning("shard %s is quarantined (%s); pass force=True to try again", paths.shard, row["last_error"])
        return _summary_from_row(paths, row)
    if not registry.lease(rid, paths.shard, source_uri, owner, lease_ttl_s, force=force):
        row = registry.shard(rid, paths.shard) or {}
        if row.get("status") in ("registered", "quarantined"):
            return _summary_from_row(paths, row)
        raise ShardBusy(
            f"shard {paths.shard} of {rid} is leased by {row.get('lease_owner')} until {row.get('lease_expires_at')}"
        )

    try:
        out = storage_for(output_root, s3)
        if out.exists(paths.data) and out.exists(paths.rejected):
            # Committed by an earlier attempt that did not get to register: no input
            # gate, no expansion, no LLM request; the figures come from the files.
            log.info("shard %s already committed; validating and registering it", paths.shard)
            registry.progress(rid, paths.shard, owner, status="committed", ttl_s=lease_ttl_s)
            summary = register_committed_shard(
                source_uri, output_root, recipe, registry, shard=paths.shard, owner=owner, s3_endpoint_url=s3
            )
            return judge_shard_after_publish(summary, output_root, recipe, settings, registry, judge_sample, columns)
        if check_input:
            report = validate_input(source_uri, recipe, paths, columns=columns, s3_endpoint_url=s3)
            _record(registry, report, rid)
            if not report.success:
                registry.quarantine(rid, paths.shard, report.reason(), report.failed, docs_uri=report.docs_uri)
                return _summary(
                    paths, source_uri, "quarantined", quality_success=False, docs_uri=report.docs_uri,
                    failed_expectations=report.failed_names, reason=report.reason(),
                )
        registry.progress(rid, paths.shard, owner, status="expanding", ttl_s=lease_ttl_s)
        heartbeat = _Heartbeat(registry, rid, paths.shard, owner, lease_ttl_s, progress)
        # The output is named after the shard; dated planning names it apart from the file.
        expand_kwargs = {"shard": paths.shard} if paths.shard != shard_name(source_uri) else {}
        result = expand_shard(
            source_uri, output_root, recipe, settings, max_docs=max_docs, columns=columns,
            progress=heartbeat, **expand_kwargs,
        )
        registry.progress(
            rid, paths.shard, owner, status="committed", counters=result.to_dict(), ttl_s=lease_ttl_s
        )
        summary = register_committed_shard(
            source_uri, output_root, recipe, registry, shard=paths.shard, result=result, owner=owner,
            s3_endpoint_url=s3,
        )
    except ShardInputError as error:
        reason = f"unusable source shard: {error}"
        registry.quarantine(rid, paths.shard, reason, [], source_uri=source_uri)
        return _summary(paths, source_uri, "quarantined", quality_success=False, failed_expectations=[], reason=reason)
    except BaseException as error:
        _mark_failed(registry, rid, paths.shard, owner, error)
        raise
    return judge_shard_after_publish(summary, output_root, recipe, settings, registry, judge_sample, columns)


def judge_shard_after_publish(
    summary: dict, output_root: str, recipe: Recipe, settings: RunSettings, registry: Registry, sample: int,
    columns: SourceColumns = DEFAULT_COLUMNS,
) -> dict:
    """The judge's measurement of a just registered shard, recorded as quality suite
    "judge". Not a gate: the shard stays registered whatever the scores, and a judge
    that cannot run is logged and named in the summary, never raised."""
    if sample < 1 or summary.get("status") != "registered" or not summary.get("newly_registered"):
        return summary
    from maga_tasks.method.judging import judge_committed_shard  # the judge path loads the tokenizer; only when asked

    try:
        report = judge_committed_shard(
            summary["source_uri"], output_root, recipe, settings, sample=sample, shard=summary["shard"], columns=columns
        )
    except (ShardInputError, EndpointsUnavailable, StorageError) as error:
        log.warning("shard %s: the judge could not run: %s", summary["shard"], error)
        return summary | {"judge_error": str(error)}
    record_judge(registry, report)
    return summary | {"judge_pass_share": report.statistics()["pass_share"], "judge_scored": report.scored,
                      "judge_uri": report.uri}


def record_judge(registry: Registry, report: "JudgeReport") -> None:
    """Keep a judge measurement as quality suite "judge" (scores <= 2 count as failed)."""
    statistics = report.statistics()
    low_scores = statistics["scores"]["1"] + statistics["scores"]["2"]
    counts = {"evaluated_expectations": report.scored, "unsuccessful_expectations": low_scores}
    registry.record_quality(report.recipe_id, report.shard, "judge", report.success, statistics | counts, [], report.uri)


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
    s3 = settings.s3_endpoint_url
    paths = shard_paths(trial_root(output_root, max_docs), recipe.recipe_id, shard or shard_name(source_uri))
    trial = {"max_docs": max_docs}
    try:
        if check_input:
            report = validate_input(source_uri, recipe, paths, columns=columns, s3_endpoint_url=s3)
            if not report.success:
                return _summary(
                    paths, source_uri, "trial", **trial, quality_success=False, docs_uri=report.docs_uri,
                    failed_expectations=report.failed_names, reason=report.reason(),
                )
        result = expand_shard(
            source_uri, output_root, recipe, settings, max_docs=max_docs, columns=columns,
            progress=progress, shard=paths.shard,
        )
    except ShardInputError as error:
        reason = f"unusable source shard: {error}"
        return _summary(paths, source_uri, "trial", **trial, quality_success=False, failed_expectations=[], reason=reason)
    report = validate_output(load_committed(paths, s3), recipe, result=result, s3_endpoint_url=s3)
    log.info(
        "trial of shard %s (first %d documents): %d accepted, %d rejected, gates %s; nothing registered, outputs under %s",
        paths.shard, max_docs, result.accepted, result.rejected, "passed" if report.success else "failed",
        paths.version_root,
    )
    return _summary(
        paths, source_uri, "trial", **trial, **_summary_figures(result),
        docs_uri=report.docs_uri,
        quality_success=report.success,
        failed_expectations=report.failed_names,
        already_committed=result.already_committed,
    )


def run_report(summaries: list[dict], registry: Registry, recipe_id: str) -> dict:
    """One run's shard outcomes by status beside the corpus totals; logged, and the
    payload of the run's corpus asset event."""
    statuses = dict(Counter(item.get("status", "unknown") for item in summaries))
    totals = registry.totals(recipe_id)
    log.info("this run: %d shard(s) %s", len(summaries), statuses)
    log.info("corpus %s totals: %s", recipe_id, totals)
    return {"recipe_id": recipe_id, "run_shards": len(summaries), "run_statuses": statuses, "totals": totals}


def _mark_failed(registry: Registry, recipe_id: str, shard: str, owner: str, error: BaseException) -> None:
    kind = "endpoints unavailable" if isinstance(error, EndpointsUnavailable) else type(error).__name__
    try:
        registry.mark_failed(recipe_id, shard, f"{kind}: {error}", owner=owner)
    except (SQLAlchemyError, RegistryError) as registry_error:  # the original error matters more
        log.error("shard %s: could not record the failure (%s) in the registry: %s", shard, error, registry_error)


__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "check_committed_shard",
    "default_owner",
    "judge_shard_after_publish",
    "record_judge",
    "publish_shard",
    "register_committed_shard",
    "result_from_committed",
    "run_report",
    "trial_shard",
]
