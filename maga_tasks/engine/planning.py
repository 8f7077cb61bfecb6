"""Planning a run: which source shards a run publishes, as `{"source_uri", "shard"}`
descriptors (the input of one mapped Airflow task each).

Two modes:
- `flat`: one corpus expanded a budget of shards per run; a run takes the first
  `budget` shards, in name order, that the registry does not hold as registered (or
  quarantined: those wait for a person).
- `dated`: date-partitioned drops. The source contains `{ds}` (e.g.
  `s3://corpus/drops/{ds}/`) and a run's logical date fills it, so a backfill over
  dates re-plans exactly those partitions. Shard names are prefixed with the date,
  `2026-11-01_part-0000`, because drops usually reuse file names from day to day and
  the output layout (`data/{shard}.parquet`) is flat per recipe.

A missing partition plans nothing (the drop has not landed, or never will for that
date); a missing flat corpus is an error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

from maga_tasks.errors import MagaError
from maga_tasks.data.layout import check_shard_name, shard_name
from maga_tasks.registry import Registry
from maga_tasks.data.source import list_source_shards
from maga_tasks.data.storage import is_s3, storage_for

log = logging.getLogger(__name__)

_DS = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DS_PLACEHOLDER = "{ds}"


class PlanningError(MagaError):
    """The source or the planning parameters cannot give a list of shards."""


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


def _unique(candidates: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for uri, shard in candidates:
        if shard in seen:
            raise PlanningError(f"two source files give the shard name {shard!r}: {seen[shard]} and {uri}")
        seen[shard] = uri
    return sorted(candidates, key=lambda pair: (pair[1], pair[0]))


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
        return _unique([(uri, shard_name(uri)) for uri in list_source_shards(source, s3_endpoint_url)])
    if mode == "dated":
        partition = partition_uri(source, ds or "")
        if not _partition_exists(partition, s3_endpoint_url):
            log.warning("partition %s does not exist; nothing to plan for %s", partition, ds)
            return []
        return _unique([(uri, dated_shard_name(ds, uri)) for uri in list_source_shards(partition, s3_endpoint_url)])
    raise PlanningError(f"mode must be 'flat' or 'dated', not {mode!r}")


def plan_shards(
    source: str,
    recipe_id: str,
    registry: Registry,
    *,
    mode: Literal["flat", "dated"] = "flat",
    ds: str | None = None,
    budget: int | None = None,
    s3_endpoint_url: str | None = None,
) -> list[dict]:
    """Shard descriptors `{"source_uri", "shard"}` for one run: the shards still to
    publish, at most `budget` (None: all). Recorded in the registry as planned."""
    if budget is not None and budget < 0:
        raise PlanningError(f"budget must be >= 0, got {budget}")
    candidates = source_shards(source, mode=mode, ds=ds, s3_endpoint_url=s3_endpoint_url)
    pending = registry.plan(candidates, recipe_id, limit=budget)
    log.info(
        "planned %d of %d %s shard(s) for %s%s (budget %s)",
        len(pending), len(candidates), mode, recipe_id, f" on {ds}" if mode == "dated" else "", budget,
    )
    return [{"source_uri": uri, "shard": shard} for uri, shard in pending]


__all__ = ["PlanningError", "dated_shard_name", "partition_uri", "plan_shards", "source_shards"]
