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
down) records the failed try, frees the lease and re-raises for the scheduler's retries.
A shard whose own tries fail `max_shard_failures` times is `failed` for good
(`ShardFailedForGood`, not worth retrying) until someone requeues it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from maga_tasks.data.layout import ShardPaths
from maga_tasks.data.outcome import SUMMARY_FIGURES, ShardOutcome, ShardResult, summary_figures
from maga_tasks.data.source import SourceColumns
from maga_tasks.data.storage import StorageError
from maga_tasks.engine.card import refresh_card
from maga_tasks.engine.commit import commit_checkpoint, publish_earlier_commit
from maga_tasks.engine.job import ShardJob, reading_source_once
from maga_tasks.engine.lease import LeaseKeeper, lease_within
from maga_tasks.engine.shard import expand
from maga_tasks.engine.trial import trial_shard
from maga_tasks.errors import EndpointsUnavailable, ShardFailedForGood, ShardInputError
from maga_tasks.quality import (
    DEFAULT_COLUMNS,
    QualityReport,
)
from maga_tasks.quality.datadocs import DATA_DOCS_SAMPLE_RATE
from maga_tasks.recipe import Recipe
from maga_tasks.redaction import clean_text
from maga_tasks.registry import LeaseLost, Registry, RegistryConflict, RegistryError, ShardBusy
from maga_tasks.settings import RunSettings, setting_default

if TYPE_CHECKING:
    from maga_tasks.method.judging import JudgeReport

log = logging.getLogger(__name__)

# Renewed every third of it, off the event loop, so it only runs out when the worker is
# gone (or cut off from the registry) that long; then a retry takes the shard over.
# Declared in the run settings table (RunSettings.lease_ttl_s).
DEFAULT_LEASE_TTL_S = setting_default("lease_ttl_s")


def default_owner() -> str:
    """A lease owner naming this process: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _outcome_from_row(paths: ShardPaths, row: dict) -> ShardOutcome:
    """The outcome of a shard already decided in the registry (registered/quarantined)."""
    return ShardOutcome.of(
        paths,
        row["source_uri"],
        row["status"],
        **{name: row[name] for name in SUMMARY_FIGURES},
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
    data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE,
    result: ShardResult | None = None,
) -> QualityReport:
    """Run the output gate on a committed shard without changing its status (the
    result is recorded when a registry is given). For `maga validate-shard`; with the
    expansion's `result`, the files must hold the documents it reported."""
    job = ShardJob.of(
        source_uri, output_root, recipe, shard=shard, s3_endpoint_url=s3_endpoint_url,
        data_docs_sample_rate=data_docs_sample_rate,
    )
    return _check(job, registry, result)


def _check(job: ShardJob, registry: Registry | None, result: ShardResult | None) -> QualityReport:
    report = job.output_gate(job.load_committed(), result)
    if registry is not None:
        registry.ensure_recipe(job.recipe)
        _record(registry, report, job.recipe_id)
    return report


def commit_and_validate(
    source_uri: str, output_root: str, recipe: Recipe, *, shard: str | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS, s3_endpoint_url: str | None = None, registry: Registry | None = None,
    data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE,
) -> QualityReport:
    """The file work of a shard after its LLM calls: commit its checkpoint, which must
    hold every document of the source (`_work/{shard}/`, as `expand_shard` leaves it
    before its commit), to `data/`, `rejected/` and `magacorpus/`, then run the output
    gate on the committed files (recorded when a `registry` is given). Nothing is leased
    or registered. Its memory does not grow with the shard: what `maga bench --scale`
    measures."""
    job = ShardJob.of(
        source_uri, output_root, recipe, shard=shard, columns=columns, s3_endpoint_url=s3_endpoint_url,
        data_docs_sample_rate=data_docs_sample_rate,
    )
    return _check(job, registry, commit_checkpoint(job))


def register_committed_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    registry: Registry,
    *,
    shard: str | None = None,
    result: ShardResult | None = None,
    lease: LeaseKeeper | None = None,
    expected_checksum: str | None = None,
    s3_endpoint_url: str | None = None,
    data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE,
) -> dict:
    """Output gate on committed files, then register (passed) or quarantine (failed).

    Idempotent: the same files again leave the registry unchanged; other files for a
    registered shard raise `RegistryConflict`. For `maga register-shard` (no lease: only
    while no live lease holds the shard) and the last step of `publish_shard`, whose
    `lease` fences the outcome (`LeaseLost` when stale) and whose commit recorded
    `expected_checksum`: files with other bytes are refused. Once registered, the
    shard's `_work/` (checkpoint, staged commit) is deleted. Returns the shard's
    summary (`ShardOutcome.to_dict`)."""
    job = ShardJob.of(
        source_uri, output_root, recipe, shard=shard, s3_endpoint_url=s3_endpoint_url,
        data_docs_sample_rate=data_docs_sample_rate,
    )
    return _register(job, registry, result=result, lease=lease, expected_checksum=expected_checksum).to_dict()


def _register(
    job: ShardJob,
    registry: Registry,
    *,
    result: ShardResult | None = None,
    lease: LeaseKeeper | None = None,
    expected_checksum: str | None = None,
) -> ShardOutcome:
    paths = job.paths
    registry.ensure_recipe(job.recipe)
    committed = job.load_committed()
    if result is None:
        result = ShardResult.committed(paths, job.source_uri, committed.figures, committed.source_identity)
    if expected_checksum is not None and committed.checksum != expected_checksum:
        raise RegistryConflict(
            f"shard {paths.shard}: data/ and rejected/ hold checksum {committed.checksum},"
            f" not the commit's {expected_checksum}; refusing to register bytes the lease did not commit"
        )
    report = job.output_gate(committed, result)
    _record(registry, report, job.recipe_id)
    outcome = ShardOutcome.of(
        paths,
        job.source_uri,
        "registered",
        **summary_figures(result),
        checksum=committed.checksum,
        docs_uri=report.docs_uri,
        quality_success=report.success,
        failed_expectations=report.failed_names,
        already_committed=result.already_committed,
        seconds=result.seconds,
        requests=result.requests,
        resumed_documents=result.resumed_documents,
    )
    if lease is not None:
        if report.success:
            lease.advance("validated")
        lease.close()  # the shard is decided next: no renewal runs beside the decision
    token = lease.token if lease is not None else None
    return _decide(job, registry, outcome, report, result, committed.checksum, token)


def _decide(
    job: ShardJob, registry: Registry, outcome: ShardOutcome, report: QualityReport, result: ShardResult,
    checksum: str, token: int | None,
) -> ShardOutcome:
    """Register the shard when its output gate passed, quarantine it otherwise; both
    fenced by lease `token` (None: only while no live lease holds the shard)."""
    paths = job.paths
    if not report.success:
        registry.quarantine(
            job.recipe_id,
            paths.shard,
            report.reason(),
            report.failed,
            result=result,
            checksum=checksum,
            docs_uri=report.docs_uri,
            token=token,
        )
        return outcome.but(status="quarantined", reason=report.reason())
    newly = registry.register(
        job.recipe_id,
        paths.shard,
        result,
        checksum,
        docs_uri=report.docs_uri,
        label_summary=report.labels,
        token=token,
    )
    if newly:  # final: nobody needs the checkpoint or a staged commit any more
        job.storage().delete_prefix(paths.work)
    log.info(
        "shard %s %s: %d docs, %d accepted, %d rejected, x%.2f expansion, checksum %s",
        paths.shard, "registered" if newly else "was already registered", result.documents,
        result.accepted, result.rejected, result.expansion_ratio, checksum[:12],
    )
    # The card's figures now include this shard; a failure to write it is only logged.
    refresh_card(job.output_root, job.recipe, registry, s3_endpoint_url=job.s3_endpoint_url)
    return outcome.but(newly_registered=newly)


@reading_source_once
def publish_shard(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    registry: Registry,
    *,
    owner: str,
    shard: str | None = None,
    lease_ttl_s: float | None = None,
    lease_wait_s: float = 0.0,
    max_docs: int | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS,
    progress: Callable[[dict], None] | None = None,
    force: bool = False,
    check_input: bool = True,
    judge_sample: int = 0,
) -> dict:
    """Publish one source shard under `recipe`; returns a small summary for an XCom
    (shard, status, counts, URIs, quality outcome, failed expectations: a
    `ShardOutcome.to_dict`).

    A shard leased by another owner is waited for up to `lease_wait_s`: a lease that is
    not renewed (its worker died) is taken over when it expires; one still renewed
    raises `ShardBusy`.

    With `judge_sample` > 0 a newly registered shard also gets the judge's measurement
    over that many rewrites (`judge_shard_after_publish`).

    `shard` defaults to the source file's name (dated planning passes its own).
    With `max_docs` it is a `trial_shard` instead: nothing is leased or registered.
    Raises `ShardBusy` when another live worker holds the lease (the task retries
    later), `EndpointsUnavailable` after recording the failed try, `ShardFailedForGood`
    when the shard's own failures reached `settings.max_shard_failures` (now or before;
    `force` tries it anyway), and `RegistryConflict` if a registered shard would get
    different content.
    """
    if max_docs is not None:
        return trial_shard(
            source_uri, output_root, recipe, settings, max_docs=max_docs, shard=shard, columns=columns,
            progress=progress, check_input=check_input,
        )
    lease_ttl_s = settings.lease_ttl_s if lease_ttl_s is None else lease_ttl_s
    job = ShardJob.of(source_uri, output_root, recipe, shard=shard, columns=columns, settings=settings)
    registry.ensure_recipe(recipe)
    outcome = _decided(job, settings, registry, force)
    if outcome is not None:
        return outcome.to_dict()
    token = lease_within(
        registry, job.recipe_id, job.shard, source_uri, owner, lease_ttl_s, force=force, wait_s=lease_wait_s
    )
    if token is None:
        row = registry.shard(job.recipe_id, job.shard) or {}
        if row.get("status") in ("registered", "quarantined"):
            return _outcome_from_row(job.paths, row).to_dict()
        raise ShardBusy(
            f"shard {job.shard} of {job.recipe_id} is leased by {row.get('lease_owner')}"
            f" until {row.get('lease_expires_at')}"
        )
    # Every write from here on is fenced by `token`; the keeper renews the lease off the
    # event loop until the shard is decided and stops this worker once it is lost.
    lease = LeaseKeeper(registry, job.recipe_id, job.shard, owner, token, lease_ttl_s, forward=progress).start()
    outcome = _publish_leased(job, settings, registry, lease, check_input)
    return judge_shard_after_publish(outcome, job, settings, registry, judge_sample).to_dict()


def _decided(job: ShardJob, settings: RunSettings, registry: Registry, force: bool) -> ShardOutcome | None:
    """The outcome of a shard the registry already decided (registered; quarantined
    unless `force`), None when it is to be published; `ShardFailedForGood` when its own
    failures reached the limit (unless `force`)."""
    row = registry.shard(job.recipe_id, job.shard)
    if row is not None and row["status"] == "registered":
        log.info("shard %s already registered (checksum %s); nothing to do", job.shard, (row["checksum"] or "")[:12])
        return _outcome_from_row(job.paths, row)
    if row is not None and row["status"] == "quarantined" and not force:
        log.warning("shard %s is quarantined (%s); pass force=True to try again", job.shard, row["last_error"])
        return _outcome_from_row(job.paths, row)
    if row is not None and row["status"] == "failed" and row["attempts"] >= settings.max_shard_failures and not force:
        raise _failed_for_good(row)
    return None


def _publish_leased(
    job: ShardJob, settings: RunSettings, registry: Registry, lease: LeaseKeeper, check_input: bool
) -> ShardOutcome:
    """Gate, expand, commit and decide a shard under `lease`; a failed try is recorded
    (and re-raised) and the lease is freed whatever happens."""
    paths, rid = job.paths, job.recipe_id
    try:
        earlier = publish_earlier_commit(job, registry.shard(rid, paths.shard))
        if earlier is not None:
            # Committed by an earlier attempt that did not get to register: no input
            # gate, no expansion, no LLM request; the figures come from the files.
            log.info("shard %s already committed; validating and registering it", paths.shard)
            lease.advance("committed")
            return _register(job, registry, lease=lease, expected_checksum=earlier.recorded_checksum)
        if check_input:
            report = job.input_gate()
            _record(registry, report, rid)
            if not report.success:
                lease.close()
                registry.quarantine(
                    rid, paths.shard, report.reason(), report.failed, docs_uri=report.docs_uri, token=lease.token
                )
                return ShardOutcome.of(
                    paths, job.source_uri, "quarantined", quality_success=False, docs_uri=report.docs_uri,
                    failed_expectations=report.failed_names, reason=report.reason(),
                )
        lease.advance("expanding")
        result = expand(job, settings, progress=lease, fence=lease)
        lease.advance("committed", counters=result.to_dict())
        return _register(job, registry, result=result, lease=lease, expected_checksum=lease.committed_checksum)
    except ShardInputError as error:
        lease.close()
        reason = f"unusable source shard: {error}"
        registry.quarantine(rid, paths.shard, reason, [], source_uri=job.source_uri, token=lease.token)
        return ShardOutcome.of(
            paths, job.source_uri, "quarantined", quality_success=False, failed_expectations=[], reason=reason
        )
    except BaseException as error:
        lease.close()
        if _mark_failed(
            registry, rid, paths.shard, lease.owner, error, settings.max_shard_failures, lease.token
        ) and isinstance(error, Exception):
            raise _failed_for_good(registry.shard(rid, paths.shard)) from error
        raise
    finally:
        lease.close()


def judge_shard_after_publish(
    outcome: ShardOutcome, job: ShardJob, settings: RunSettings, registry: Registry, sample: int
) -> ShardOutcome:
    """The judge's measurement of a just registered shard, recorded as quality suite
    "judge". Not a gate: the shard stays registered whatever the scores, and a judge
    that cannot run is logged and named in the outcome, never raised."""
    if sample < 1 or outcome.status != "registered" or outcome.newly_registered is not True:
        return outcome
    from maga_tasks.method.judging import judge_committed_shard  # the judge path loads the tokenizer; only when asked

    try:
        report = judge_committed_shard(
            job.source_uri, job.output_root, job.recipe, settings, sample=sample, shard=job.shard, columns=job.columns
        )
    except (ShardInputError, EndpointsUnavailable, StorageError) as error:
        log.warning("shard %s: the judge could not run: %s", outcome.shard, error)
        return outcome.but(judge_error=clean_text(error))
    record_judge(registry, report)
    statistics = report.statistics()
    return outcome.but(
        judge_pass_share=statistics["pass_share"], judge_genre_kept_share=statistics["genre_kept_share"],
        judge_scored=report.scored, judge_uri=report.uri,
    )


def record_judge(registry: Registry, report: "JudgeReport") -> None:
    """Keep a judge measurement as quality suite "judge" (scores <= 2 count as failed)."""
    statistics = report.statistics()
    low_scores = statistics["scores"]["1"] + statistics["scores"]["2"]
    counts = {"evaluated_expectations": report.scored, "unsuccessful_expectations": low_scores}
    registry.record_quality(
        report.recipe_id, report.shard, "judge", report.success, statistics | counts, [], report.uri
    )


def _mark_failed(
    registry: Registry, recipe_id: str, shard: str, owner: str, error: BaseException, max_failures: int, token: int
) -> bool:
    """Record a failed try of lease `token` (nothing when it is stale); True when it made
    the shard failed for good. The fleet's failures (every endpoint down or refusing) and
    a lost lease are not the shard's and never final."""
    fleet = isinstance(error, EndpointsUnavailable)
    kind = "endpoints unavailable" if fleet else type(error).__name__
    not_own = fleet or isinstance(error, LeaseLost)
    try:
        status = registry.mark_failed(
            recipe_id, shard, f"{kind}: {error}", owner=owner, max_failures=None if not_own else max_failures,
            token=token,
        )
    except (SQLAlchemyError, RegistryError) as registry_error:  # the original error matters more
        log.error("shard %s: could not record the failure (%s) in the registry: %s", shard, error, registry_error)
        return False
    if status == "failed":
        log.error("shard %s is failed for good (max_shard_failures=%d); requeue it once the cause is fixed",
                  shard, max_failures)
    return status == "failed"


def _failed_for_good(row: dict) -> ShardFailedForGood:
    return ShardFailedForGood(
        f"shard {row['shard']} of {row['recipe_id']} failed for good after {row['attempts']} tries"
        f" ({row['last_error']}); requeue it (`maga requeue`, DAG param requeue) once the cause is fixed"
    )


__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "check_committed_shard",
    "commit_and_validate",
    "default_owner",
    "judge_shard_after_publish",
    "record_judge",
    "publish_shard",
    "register_committed_shard",
    "trial_shard",
]
