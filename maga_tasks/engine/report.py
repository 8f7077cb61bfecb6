"""The report of one run: what became of its shards (failed ones named), what is left of
its corpus or partition, the release manifest its corpus asset event carries, and
whether a further run must continue what one run could not map whole (a partition, or
the rest of a flat night's budget: `engine.continuation`).

The DAG's summarize step logs it and emits it as the asset event's extra, so it stays
small: counts, shard names, and per registered shard only its data URI and checksum.
"""

from __future__ import annotations

import logging
from collections import Counter

from maga_tasks.engine.continuation import budget_left, should_continue
from maga_tasks.engine.planning import RunPlan
from maga_tasks.redaction import clean_text
from maga_tasks.registry import Registry

log = logging.getLogger(__name__)

# A manifest entry: what a consumer needs to fetch one registered shard and verify it.
MANIFEST_FIELDS = ("shard", "data_uri", "checksum")
_ERROR_CHARS = 300


def release_manifest(summaries: list[dict]) -> list[dict]:
    """The registered shards among a run's summaries, `{"shard", "data_uri", "checksum"}`."""
    return [
        {name: item.get(name) for name in MANIFEST_FIELDS} for item in summaries if item.get("status") == "registered"
    ]


def failed_shards(planned: list[dict], summaries: list[dict], registry: Registry, recipe_id: str) -> list[dict]:
    """The planned shards whose task gave no summary (it failed), with their registry
    status (`failed` for good, or `planned` for a later try), tries and last error."""
    done = {item["shard"] for item in summaries}
    failed = []
    for descriptor in planned:
        if descriptor["shard"] in done:
            continue
        row = registry.shard(recipe_id, descriptor["shard"]) or {}
        failed.append({
            "shard": descriptor["shard"],
            "status": row.get("status"),
            "attempts": row.get("attempts"),
            # Cleaned again: a row written before errors were cleaned on the way in.
            "error": clean_text(row.get("last_error") or "", _ERROR_CHARS),
        })
    return failed


def run_report(
    summaries: list[dict],
    registry: Registry,
    recipe_id: str,
    *,
    planned: list[dict] | None = None,
    after: RunPlan | None = None,
    budget: int | None = None,
) -> dict:
    """One run's outcome: shard statuses (a planned shard without a summary counts as
    failed, and is named), the release manifest, the recipe's totals and, given `after`
    (the plan as it stands after the run), how many shards are left and whether a
    further run continues the partition or, given the flat night's `budget`, the rest of
    it (`budget_left`). Logged; the corpus asset event's extra."""
    failed = failed_shards(planned or [], summaries, registry, recipe_id)
    statuses = Counter(item.get("status", "unknown") for item in summaries)
    if failed:
        statuses["failed"] += len(failed)
    report = {
        "recipe_id": recipe_id,
        "run_shards": len(summaries) + len(failed),
        "run_statuses": dict(statuses),
        "failed": len(failed),
        "failed_shards": failed,
        "manifest": release_manifest(summaries),
        "totals": registry.totals(recipe_id),
    }
    log.info("this run: %d shard(s) %s", report["run_shards"], report["run_statuses"])
    if failed:
        log.warning(
            "%d shard(s) failed: %s", len(failed),
            "; ".join(f"{f['shard']} ({f['status']} after {f['attempts']} tries: {f['error'][:120]})" for f in failed),
        )
    if after is not None:
        left_of_budget = budget_left(budget, planned or []) if after.mode == "flat" else None
        report |= {
            "mode": after.mode,
            "ds": after.ds,
            "left": after.left,
            "pending": len(after.pending),
            "failed_for_good": len(after.failed),
            "complete": after.left == 0,
            "budget": budget if after.mode == "flat" else None,
            "budget_left": left_of_budget,
            "continue": should_continue(planned or [], after, budget_left=left_of_budget),
        }
        log.info(
            "%s: %d shard(s) left (%d to publish, %d failed for good)%s",
            f"partition {after.ds}" if after.mode == "dated" else "corpus", after.left, len(after.pending),
            len(after.failed),
            ("; a further run continues the partition" if after.mode == "dated"
             else f"; a further run continues with {left_of_budget} shard(s) of the night's budget")
            if report["continue"] else "",
        )
    log.info("corpus %s totals: %s", recipe_id, report["totals"])
    return report


__all__ = ["MANIFEST_FIELDS", "failed_shards", "release_manifest", "run_report"]
