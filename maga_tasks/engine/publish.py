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

import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from maga_tasks.errors import EndpointsUnavailable, ShardFailedForGood, ShardInputError
from maga_tasks.data.layout import ShardPaths, shard_name, shard_paths, trial_root
from maga_tasks.quality import (
    DEFAULT_COLUMNS,
    CommittedShard,
    QualityReport,
    load_committed,
    validate_input,
    validate_output,
)
from maga_tasks.quality.datadocs import DATA_DOCS_SAMPLE_RATE
from maga_tasks.recipe import Recipe
from maga_tasks.redaction import clean_text
from maga_tasks.registry import LeaseLost, Registry, RegistryConflict, RegistryError, ShardBusy, utc_now
from maga_tasks.settings import RunSettings
from maga_tasks.engine.lease import LeaseKeeper
from maga_tasks.engine.shard import ShardResult, commit_checkpoint, expand_shard, publish_staged, source_limits
from maga_tasks.data.committed import staged_checksum
from maga_tasks.data.outcome import SUMMARY_FIGURES, ShardOutcome
from maga_tasks.data.source import SourceColumns
from maga_tasks.data.storage import StorageError, read_once, storage_for

if TYPE_CHECKING:
    from maga_tasks.method.judging import JudgeReport

log = logging.getLogger(__name__)

# Renewed every third of it, off the event loop, so it only runs out when the worker is
# gone (or cut off from the registry) that long; then a retry takes the shard over.
DEFAULT_LEASE_TTL_S = 300.0


def default_owner() -> str:
    """A lease owner naming this process: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _summary_figures(result: ShardResult) -> dict:
    return {name: getattr(result, name) for name in SUMMARY_FIGURES}


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


def result_from_committed(committed: CommittedShard, source_uri: str) -> ShardResult:
    """The ShardResult of committed files (when no expansion ran in this process)."""
    return ShardResult.of(
        committed.paths, source_uri, committed.figures, already_committed=True, source_identity=committed.source_identity
    )


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
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    committed = load_committed(paths, s3_endpoint_url)
    report = validate_output(
        committed, recipe, result=result, s3_endpoint_url=s3_endpoint_url, data_docs_sample_rate=data_docs_sample_rate
    )
    if registry is not None:
        registry.ensure_recipe(recipe)
        _record(registry, report, recipe.recipe_id)
    return report


def commit_and_validate(
    source_uri: str, output_root: str, recipe: Recipe, *, shard: str | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS, s3_endpoint_url: str | None = None, **gate,
) -> QualityReport:
    """The file work of a shard after its LLM calls: commit its checkpoint, which must
    hold every document of the source (`_work/{shard}/`, as `expand_shard` leaves it
    before its commit), to `data/`, `rejected/` and `magacorpus/`, then run the output
    gate on the committed files. Nothing is leased or registered. Its memory does not
    grow with the shard: what `maga bench --scale` measures. `gate` goes to
    `check_committed_shard` (`registry`, `data_docs_sample_rate`)."""
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    out = storage_for(output_root, s3_endpoint_url)
    result = commit_checkpoint(
        source_uri, paths, out, columns=columns, s3_endpoint_url=s3_endpoint_url, limits=source_limits(recipe)
    )
    return check_committed_shard(
        source_uri, output_root, recipe, shard=paths.shard, s3_endpoint_url=s3_endpoint_url, result=result, **gate
    )


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
    return _register(
        source_uri, output_root, recipe, registry, shard=shard, result=result, lease=lease,
        expected_checksum=expected_checksum, s3_endpoint_url=s3_endpoint_url, data_docs_sample_rate=data_docs_sample_rate,
    ).to_dict()


def _register(
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
) -> ShardOutcome:
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    registry.ensure_recipe(recipe)
    committed = load_committed(paths, s3_endpoint_url)
    if result is None:
        result = result_from_committed(committed, source_uri)
    if expected_checksum is not None and committed.checksum != expected_checksum:
        raise RegistryConflict(
            f"shard {paths.shard}: data/ and rejected/ hold checksum {committed.checksum},"
            f" not the commit's {expected_checksum}; refusing to register bytes the lease did not commit"
        )
    report = validate_output(
        committed, recipe, result=result, s3_endpoint_url=s3_endpoint_url, data_docs_sample_rate=data_docs_sample_rate
    )
    _record(registry, report, recipe.recipe_id)
    token = lease.token if lease is not None else None
    outcome = ShardOutcome.of(
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
    if lease is not None:
        if report.success:
            lease.advance("validated")
        lease.close()  # the shard is decided next: no renewal runs beside the decision
    if not report.success:
        registry.quarantine(
            recipe.recipe_id,
            paths.shard,
            report.reason(),
            report.failed,
            result=result,
            checksum=committed.checksum,
            docs_uri=report.docs_uri,
            token=token,
        )
        return outcome.but(status="quarantined", reason=report.reason())
    newly = registry.register(
        recipe.recipe_id,
        paths.shard,
        result,
        committed.checksum,
        docs_uri=report.docs_uri,
        label_summary=report.labels,
        token=token,
    )
    if newly:  # final: nobody needs the checkpoint or a staged commit any more
        storage_for(paths.work, s3_endpoint_url).delete_prefix(paths.work)
    log.info(
        "shard %s %s: %d docs, %d accepted, %d rejected, x%.2f expansion, checksum %s",
        paths.shard, "registered" if newly else "was already registered", result.documents,
        result.accepted, result.rejected, result.expansion_ratio, committed.checksum[:12],
    )
    return outcome.but(newly_registered=newly)


def _reading_source_once(function):
    """`function(source_uri, ...)` with its S3 source downloaded once: the input gate,
    the expansion and the judge each read it (`read_once`)."""

    @functools.wraps(function)
    def reading(*args, **kwargs):
        with read_once(args[0] if args else kwargs["source_uri"]):
            return function(*args, **kwargs)

    return reading


def _lease_within(
    registry: Registry, rid: str, shard: str, source_uri: str, owner: str, ttl_s: float, force: bool, wait_s: float
) -> int | None:
    """The lease's token, waiting up to `wait_s` for another owner's lease to expire
    (None when it stays held, or the shard was decided meanwhile)."""
    deadline = time.monotonic() + wait_s
    waited_for = None
    while True:
        token = registry.lease(rid, shard, source_uri, owner, ttl_s, force=force)
        left = deadline - time.monotonic()
        if token is not None or left <= 0:
            return token
        row = registry.shard(rid, shard) or {}
        if row.get("status") in ("registered", "quarantined") or not row.get("lease_expires_at"):
            return None
        expires_in = (datetime.fromisoformat(row["lease_expires_at"]) - utc_now()).total_seconds()
        if row.get("lease_owner") != waited_for:
            waited_for = row.get("lease_owner")
            log.info("shard %s is leased by %s for %.0fs more; waiting up to %.0fs for it", shard, waited_for,
                     expires_in, left)
        time.sleep(min(max(expires_in + 0.1, 0.1), 5.0, left))


def _publish_staged_commit(out, paths: ShardPaths, row: dict) -> str | None:
    """Publish the commit an earlier lease recorded and staged but may not have published
    (it stopped between its commit and its copies): exactly the bytes of the recorded
    checksum. Returns the checksum of the shard's recorded, undecided commit (published
    now or before), which its files must hold; None when there is none."""
    token = row.get("commit_token")
    if token is None:
        return None
    if not all(out.exists(uri) for uri, _ in paths.staged(token)):
        return row["checksum"]  # published already: staged files are deleted only after the copies
    checksum = staged_checksum(out, paths, token)
    if checksum != row["checksum"]:
        raise RegistryConflict(
            f"shard {paths.shard}: the commit staged by lease {token} has checksum {checksum},"
            f" the registry recorded {row['checksum']}"
        )
    log.info("shard %s: publishing the commit of lease %d (checksum %s)", paths.shard, token, checksum[:12])
    publish_staged(out, paths, token)
    return checksum


@_reading_source_once
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
    lease_wait_s: float = 0.0,
    max_docs: int | None = None,
    columns: SourceColumns = DEFAULT_COLUMNS,
    progress: Callable[[dict], None] | None = None,
    force: bool = False,
    check_input: bool = True,
    judge_sample: int = 0,
) -> dict:
    """Publish one source shard under `recipe`; returns a small summary for an XCom
    (shard, status, counts, URIs, quality outcome, failed expectations).

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
    return _publish(
        source_uri, output_root, recipe, settings, registry, owner=owner, shard=shard, lease_ttl_s=lease_ttl_s,
        lease_wait_s=lease_wait_s, columns=columns, progress=progress, force=force, check_input=check_input,
        judge_sample=judge_sample,
    ).to_dict()


def _publish(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    registry: Registry,
    *,
    owner: str,
    shard: str | None,
    lease_ttl_s: float,
    lease_wait_s: float,
    columns: SourceColumns,
    progress: Callable[[dict], None] | None,
    force: bool,
    check_input: bool,
    judge_sample: int,
) -> ShardOutcome:
    s3 = settings.s3_endpoint_url
    docs_rate = settings.data_docs_sample_rate
    paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
    rid = recipe.recipe_id
    registry.ensure_recipe(recipe)

    row = registry.shard(rid, paths.shard)
    if row is not None and row["status"] == "registered":
        log.info("shard %s already registered (checksum %s); nothing to do", paths.shard, (row["checksum"] or "")[:12])
        return _outcome_from_row(paths, row)
    if row is not None and row["status"] == "quarantined" and not force:
        log.warning("shard %s is quarantined (%s); pass force=True to try again", paths.shard, row["last_error"])
        return _outcome_from_row(paths, row)
    if row is not None and row["status"] == "failed" and row["attempts"] >= settings.max_shard_failures and not force:
        raise _failed_for_good(row)
    token = _lease_within(registry, rid, paths.shard, source_uri, owner, lease_ttl_s, force, lease_wait_s)
    if token is None:
        row = registry.shard(rid, paths.shard) or {}
        if row.get("status") in ("registered", "quarantined"):
            return _outcome_from_row(paths, row)
        raise ShardBusy(
            f"shard {paths.shard} of {rid} is leased by {row.get('lease_owner')} until {row.get('lease_expires_at')}"
        )

    # Every write from here on is fenced by `token`; the keeper renews the lease off the
    # event loop until the shard is decided and stops this worker once it is lost.
    lease = LeaseKeeper(registry, rid, paths.shard, owner, token, lease_ttl_s, forward=progress).start()
    try:
        out = storage_for(output_root, s3)
        recorded = _publish_staged_commit(out, paths, registry.shard(rid, paths.shard))
        if out.exists(paths.data) and out.exists(paths.rejected):
            # Committed by an earlier attempt that did not get to register: no input
            # gate, no expansion, no LLM request; the figures come from the files.
            log.info("shard %s already committed; validating and registering it", paths.shard)
            lease.advance("committed")
            outcome = _register(
                source_uri, output_root, recipe, registry, shard=paths.shard, lease=lease,
                expected_checksum=recorded, s3_endpoint_url=s3, data_docs_sample_rate=docs_rate,
            )
            return judge_shard_after_publish(outcome, output_root, recipe, settings, registry, judge_sample, columns)
        if check_input:
            report = validate_input(
                source_uri, recipe, paths, columns=columns, s3_endpoint_url=s3, data_docs_sample_rate=docs_rate
            )
            _record(registry, report, rid)
            if not report.success:
                lease.close()
                registry.quarantine(
                    rid, paths.shard, report.reason(), report.failed, docs_uri=report.docs_uri, token=token
                )
                return ShardOutcome.of(
                    paths, source_uri, "quarantined", quality_success=False, docs_uri=report.docs_uri,
                    failed_expectations=report.failed_names, reason=report.reason(),
                )
        lease.advance("expanding")
        # The output is named after the shard; dated planning names it apart from the file.
        expand_kwargs = {"shard": paths.shard} if paths.shard != shard_name(source_uri) else {}
        result = expand_shard(
            source_uri, output_root, recipe, settings, columns=columns, progress=lease, fence=lease, **expand_kwargs,
        )
        lease.advance("committed", counters=result.to_dict())
        outcome = _register(
            source_uri, output_root, recipe, registry, shard=paths.shard, result=result, lease=lease,
            expected_checksum=lease.committed_checksum, s3_endpoint_url=s3, data_docs_sample_rate=docs_rate,
        )
    except ShardInputError as error:
        lease.close()
        reason = f"unusable source shard: {error}"
        registry.quarantine(rid, paths.shard, reason, [], source_uri=source_uri, token=token)
        return ShardOutcome.of(
            paths, source_uri, "quarantined", quality_success=False, failed_expectations=[], reason=reason
        )
    except BaseException as error:
        lease.close()
        if _mark_failed(
            registry, rid, paths.shard, owner, error, settings.max_shard_failures, token
        ) and isinstance(error, Exception):
            raise _failed_for_good(registry.shard(rid, paths.shard)) from error
        raise
    finally:
        lease.close()
    return judge_shard_after_publish(outcome, output_root, recipe, settings, registry, judge_sample, columns)


def judge_shard_after_publish(
    outcome: ShardOutcome, output_root: str, recipe: Recipe, settings: RunSettings, registry: Registry, sample: int,
    columns: SourceColumns = DEFAULT_COLUMNS,
) -> ShardOutcome:
    """The judge's measurement of a just registered shard, recorded as quality suite
    "judge". Not a gate: the shard stays registered whatever the scores, and a judge
    that cannot run is logged and named in the outcome, never raised."""
    if sample < 1 or outcome.status != "registered" or outcome.newly_registered is not True:
        return outcome
    from maga_tasks.method.judging import judge_committed_shard  # the judge path loads the tokenizer; only when asked

    try:
        report = judge_committed_shard(
            outcome.source_uri, output_root, recipe, settings, sample=sample, shard=outcome.shard, columns=columns
        )
    except (ShardInputError, EndpointsUnavailable, StorageError) as error:
        log.warning("shard %s: the judge could not run: %s", outcome.shard, error)
        return outcome.but(judge_error=clean_text(error))
    record_judge(registry, report)
    return outcome.but(
        judge_pass_share=report.statistics()["pass_share"], judge_scored=report.scored, judge_uri=report.uri
    )


def record_judge(registry: Registry, report: "JudgeReport") -> None:
    """Keep a judge measurement as quality suite "judge" (scores <= 2 count as failed)."""
    statistics = report.statistics()
    low_scores = statistics["scores"]["1"] + statistics["scores"]["2"]
    counts = {"evaluated_expectations": report.scored, "unsuccessful_expectations": low_scores}
    registry.record_quality(report.recipe_id, report.shard, "judge", report.success, statistics | counts, [], report.uri)


@_reading_source_once
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
    return _trial(
        source_uri, output_root, recipe, settings, max_docs=max_docs, shard=shard, columns=columns,
        progress=progress, check_input=check_input,
    ).to_dict()


def _trial(
    source_uri: str,
    output_root: str,
    recipe: Recipe,
    settings: RunSettings,
    *,
    max_docs: int,
    shard: str | None,
    columns: SourceColumns,
    progress: Callable[[dict], None] | None,
    check_input: bool,
) -> ShardOutcome:
    s3 = settings.s3_endpoint_url
    paths = shard_paths(trial_root(output_root, max_docs), recipe.recipe_id, shard or shard_name(source_uri))
    trial = {"max_docs": max_docs}
    docs_rate = settings.data_docs_sample_rate
    try:
        if check_input:
            report = validate_input(
                source_uri, recipe, paths, columns=columns, s3_endpoint_url=s3, data_docs_sample_rate=docs_rate
            )
            if not report.success:
                return ShardOutcome.of(
                    paths, source_uri, "trial", **trial, quality_success=False, docs_uri=report.docs_uri,
                    failed_expectations=report.failed_names, reason=report.reason(),
                )
        result = expand_shard(
            source_uri, output_root, recipe, settings, max_docs=max_docs, columns=columns,
            progress=progress, shard=paths.shard,
        )
    except ShardInputError as error:
        reason = f"unusable source shard: {error}"
        return ShardOutcome.of(
            paths, source_uri, "trial", **trial, quality_success=False, failed_expectations=[], reason=reason
        )
    report = validate_output(
        load_committed(paths, s3), recipe, result=result, s3_endpoint_url=s3, data_docs_sample_rate=docs_rate
    )
    log.info(
        "trial of shard %s (first %d documents): %d accepted, %d rejected, gates %s; nothing registered, outputs under %s",
        paths.shard, max_docs, result.accepted, result.rejected, "passed" if report.success else "failed",
        paths.version_root,
    )
    return ShardOutcome.of(
        paths, source_uri, "trial", **trial, **_summary_figures(result),
        docs_uri=report.docs_uri,
        quality_success=report.success,
        failed_expectations=report.failed_names,
        already_committed=result.already_committed,
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
    "result_from_committed",
    "trial_shard",
]
