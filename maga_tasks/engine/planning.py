"""Planning a run: which source shards a run publishes, as `{"source_uri", "shard"}`
descriptors (the input of one mapped Airflow task each).

Two modes:
- `flat`: one corpus expanded a budget of shards per night (`engine.budget`); a run
  takes the first `budget` shards, in name order, that the registry does not hold as
  registered (or quarantined: those wait for a person), at most `max_shards`; the rest of
  the budget goes to further runs (`engine.continuation`).
- `dated`: date-partitioned drops. The source contains `{ds}` (e.g.
  `s3://corpus/drops/{ds}/`) and a run's logical date fills it, so a backfill over
  dates re-plans exactly those partitions. A run takes its whole partition (the budget
  is for flat corpora); only `max_shards`, the most one run can map (Airflow's
  `max_map_length`), holds shards back for a further run. Shard names are prefixed
  with the date, `2026-11-01_part-0000`, because drops usually reuse file names from
  day to day and the output layout (`data/{shard}.parquet`) is flat per recipe.

In both modes never-tried shards come before retried ones, and a shard that failed
`max_failures` tries is failed for good: it leaves the plan until it is requeued.
File names are untrusted: a file whose name makes no shard name (`%.parquet`, control
characters), and every file of a group whose names make one shard name, is reported
(one warning each, the name shown escaped) and left out; the rest is planned.
A missing partition plans nothing (the drop has not landed, or never will for that
date); a missing flat corpus is an error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from maga_tasks.data.layout import LayoutError, check_shard_name, shard_name
from maga_tasks.data.source import list_source_shards, shown
from maga_tasks.data.storage import is_s3, storage_for
from maga_tasks.errors import EXIT_BAD_INPUT, MagaError
from maga_tasks.registry import Registry

log = logging.getLogger(__name__)

_DS = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DS_PLACEHOLDER = "{ds}"


class PlanningError(MagaError):
    """The source or the planning parameters cannot give a list of shards."""

    exit_code = EXIT_BAD_INPUT


def dated_shard_name(ds: str, source_uri: str) -> str:
    """The shard name of a file in the `ds` partition: `{ds}_{file name}`."""
    return check_shard_name(f"{ds}_{shard_name(source_uri)}")


def partition_uri(source: str, ds: str) -> str:
    """The source of one date: `{ds}` in `source` replaced by the run's date."""
    if DS_PLACEHOLDER not in source:
        raise PlanningError(f"dated planning needs '{DS_PLACEHOLDER}' in the source: {source}")
    if not ds or not _DS.match(ds):
        raise PlanningError(f"dated planning needs ds as YYYY-MM-DD, got {ds!r}")
    return source.replace(DS_PLACEHOLDER, ds)


def _partition_exists(uri: str, s3_endpoint_url: str | None) -> bool:
    if is_s3(uri):
        return bool(storage_for(uri, s3_endpoint_url).list(uri))
    return Path(uri).exists()


def _named(uris: list[str], name: Callable[[str], str]) -> list[tuple[str, str]]:
    """`(uri, shard)` of every file whose name makes a shard name, in shard name order;
    the others, and every file of a group whose names make one shard name, are reported
    and left out (which of them is the shard is not ours to guess)."""
    by_shard: dict[str, list[str]] = {}
    for uri in uris:
        try:
            by_shard.setdefault(name(uri), []).append(uri)
        except LayoutError:
            log.warning("source file %s: its name makes no shard name; skipped", shown(uri))
    for shard, group in by_shard.items():
        if len(group) > 1:
            for uri in group:
                log.warning("source file %s: %d files give the shard name %s; skipped", shown(uri), len(group), shard)
    return sorted(((group[0], shard) for shard, group in by_shard.items() if len(group) == 1), key=lambda p: p[1])


def source_shards(
    source: str,
    *,
    mode: Literal["flat", "dated"] = "flat",
    ds: str | None = None,
    s3_endpoint_url: str | None = None,
) -> list[tuple[str, str]]:
    """Every `(source_uri, shard)` of the corpus (flat) or of the `ds` partition (dated),
    in shard name order."""
    if mode == "flat":
        if DS_PLACEHOLDER in source:
            raise PlanningError(f"the source contains '{DS_PLACEHOLDER}': use mode='dated' ({source})")
        return _named(list_source_shards(source, s3_endpoint_url), shard_name)
    if mode == "dated":
        partition = partition_uri(source, ds or "")
        if not _partition_exists(partition, s3_endpoint_url):
            log.warning("partition %s does not exist; nothing to plan for %s", partition, ds)
            return []
        return _named(list_source_shards(partition, s3_endpoint_url), lambda uri: dated_shard_name(ds, uri))
    raise PlanningError(f"mode must be 'flat' or 'dated', not {mode!r}")


@dataclass(frozen=True)
class RunPlan:
    """What one run does with its corpus (flat) or partition (dated): the shards it
    publishes, and what it leaves and why."""

    mode: str
    ds: str | None
    recipe_id: str
    candidates: int  # source shards listed
    shards: list[dict]  # {"source_uri", "shard"} this run publishes, never-tried first
    held_back: list[str]  # still to do, over this run's limit
    retried: int  # shards of `shards` tried before
    registered: int
    quarantined: int
    failed: list[str]  # failed for good: out of the plan until requeued

    @property
    def pending(self) -> list[str]:
        """Every shard still to publish: this run's, then those held back."""
        return [d["shard"] for d in self.shards] + self.held_back

    @property
    def left(self) -> int:
        """Shards neither registered nor quarantined: the corpus or partition is
        complete at 0 (failed-for-good shards count until requeued and done)."""
        return len(self.pending) + len(self.failed)

    def summary(self) -> dict:
        """The plan as JSON for the CLI and logs (names only for what this run does)."""
        return {
            "recipe_id": self.recipe_id,
            "mode": self.mode,
            "ds": self.ds,
            "candidates": self.candidates,
            "publish": self.shards,
            "retried": self.retried,
            "skipped": {"registered": self.registered, "quarantined": self.quarantined, "failed": len(self.failed)},
            "failed_shards": self.failed,
            "held_back": len(self.held_back),
            "left": self.left,
        }


def plan_run(
    source: str,
    recipe_id: str,
    registry: Registry,
    *,
    mode: Literal["flat", "dated"] = "flat",
    ds: str | None = None,
    budget: int | None = None,
    max_shards: int | None = None,
    max_failures: int | None = None,
    s3_endpoint_url: str | None = None,
    record: bool = True,
) -> RunPlan:
    """Plan one run. A flat run takes at most `budget` shards, a dated run its whole
    partition; either at most `max_shards` (None: no limit). A shard that failed
    `max_failures` tries is left out (None: every failed shard). With `record` the
    shards of the run are recorded as planned; without, nothing is written (a dry run)."""
    for name, value in (("budget", budget), ("max_shards", max_shards)):
        if value is not None and value < 0:
            raise PlanningError(f"{name} must be >= 0, got {value}")
    candidates = source_shards(source, mode=mode, ds=ds, s3_endpoint_url=s3_endpoint_url)
    triage = registry.triage(candidates, recipe_id, max_failures=max_failures)
    limits = [n for n in (budget if mode == "flat" else None, max_shards) if n is not None]
    limit = min(limits) if limits else len(triage.pending)
    chosen, held_back = triage.pending[:limit], triage.pending[limit:]
    if record:
        registry.record_planned(recipe_id, chosen)
    plan = RunPlan(
        mode=mode,
        ds=ds if mode == "dated" else None,
        recipe_id=recipe_id,
        candidates=len(candidates),
        shards=[{"source_uri": uri, "shard": shard} for uri, shard in chosen],
        held_back=[shard for _, shard in held_back],
        retried=sum(shard in triage.retried for _, shard in chosen),
        registered=len(triage.registered),
        quarantined=len(triage.quarantined),
        failed=triage.failed,
    )
    log.info(
        "%s %d of %d %s shard(s) for %s%s (%d retried; skipped %d registered, %d quarantined, %d failed for good;"
        " %d held back for a further run)",
        "planned" if record else "would plan", len(chosen), len(candidates), mode, recipe_id,
        f" on {ds}" if mode == "dated" else "", plan.retried, plan.registered, plan.quarantined, len(plan.failed),
        len(plan.held_back),
    )
    return plan


def plan_shards(source: str, recipe_id: str, registry: Registry, **options) -> list[dict]:
    """Shard descriptors `{"source_uri", "shard"}` for one run: `plan_run(...).shards`
    (same options), recorded in the registry as planned."""
    return plan_run(source, recipe_id, registry, **options).shards


__all__ = ["PlanningError", "RunPlan", "dated_shard_name", "partition_uri", "plan_run", "plan_shards", "source_shards"]
