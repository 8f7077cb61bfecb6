"""The per-shard announcement of a corpus version: which shard outcomes a shard task
announces to downstream pipelines, exactly once per registered shard, and what the
announcement carries. Knows nothing of Airflow: the DAG turns an announcement into an
asset event on `SHARDS_ASSET_URI` whose partition key is the shard's name.

Exactly once: a shard task announces the shard it registered itself. A shard it found
registered (a no-op: registered by an earlier run, or by `maga register-shard`) or that
it quarantined is not announced. The one gap is a crash *between* registering and the
end of the task: Airflow records a task's asset events only when the task succeeds, so
that try announced nothing, and its retry finds the shard registered. The retry then
announces it when the registration was made by an earlier try of the same task
instance and Airflow holds no event of that task instance yet (`announcement`'s
`announced_before`): a clear of a task that had succeeded finds its event and stays
quiet; a retry after the crash, or a clear of that crashed task, announces. A task
that registered a shard and then failed every try leaves it unannounced until it is
cleared.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the DAG files import this module when parsed: nothing heavy here
    from maga_tasks.registry import Registry

# One asset for every corpus version's shards, partitioned by shard name, the recipe id
# in the event's extra. Not `maga://corpus/{recipe_id}`: a DAG can only schedule on an
# asset it names when it is parsed, and the recipe id is known when the run starts;
# Airflow 3.3 also drops a per-event partition key emitted through an asset alias (the
# alias path uses the run's partition key), which is how the run-level event reaches
# the per-recipe asset.
SHARDS_ASSET_URI = "maga://corpus/shards"
SHARDS_ASSET_NAME = "maga-corpus-shards"
# What a consumer needs to fetch one registered shard, verify it and size it.
EXTRA_FIELDS = (
    "recipe_id",
    "corpus_uri",
    "shard",
    "data_uri",
    "rejected_uri",
    "checksum",
    "documents",
    "accepted",
    "rejected",
    "prompt_tokens",
    "completion_tokens",
    "expansion_ratio",
)
_TRY = "/try-"
# How far before the registration time the crash-retry path looks for an earlier event:
# the registry's clock is the worker's, the event's the api-server's.
CLOCK_MARGIN = timedelta(minutes=10)


def task_instance_owner(dag_id: str, task_id: str, map_index: int, run_id: str, try_number: int) -> str:
    """The lease owner of one try of a shard task; its tries share everything before `/try-`."""
    return f"airflow:{dag_id}/{task_id}/{map_index}/{run_id}{_TRY}{try_number}"


def _task_instance(owner: str | None) -> str | None:
    """The task instance part of an owner (`task_instance_owner`), None for other owners."""
    if not owner or not owner.startswith("airflow:") or _TRY not in owner:
        return None
    return owner.rsplit(_TRY, 1)[0]


def registered_by(registry: Registry, recipe_id: str, shard: str) -> str | None:
    """The owner of the lease under which the shard was registered (from its audit
    trail: the registration names its lease token, the lease or takeover names its
    owner); None when it was registered without a lease."""
    owners: dict[object, str | None] = {}
    token = None
    for event in registry.events(recipe_id, shard):
        detail = event.get("detail") or {}
        if event["event"] in ("lease", "takeover"):
            owners[detail.get("token")] = event.get("owner")
        elif event["event"] == "register":
            token = detail.get("token")
    return owners.get(token) if token is not None else None


def shard_event_extra(summary: dict, output_root: str) -> dict:
    """The extra of a shard's asset event: files (the corpus version's folder too),
    checksum and figures; no text."""
    from maga_tasks.data.storage import join

    fields = summary | {"corpus_uri": join(output_root, summary["recipe_id"])}
    return {name: fields[name] for name in EXTRA_FIELDS if name in fields}


def announcement(
    summary: dict,
    *,
    output_root: str,
    registry: Registry,
    owner: str,
    announced_before: Callable[[datetime], bool],
) -> dict | None:
    """The extra of the asset event announcing the shard of `summary` (a shard task's
    outcome, `ShardOutcome.to_dict`), or None when this try must not announce it.

    `owner` is this try's lease owner (`task_instance_owner`); `announced_before(since)`
    says whether Airflow already holds an event of this task instance on the shards
    asset since `since` (asked only on the crash-retry path)."""
    if summary.get("status") != "registered":
        return None  # quarantined, failed, or a trial
    if summary.get("newly_registered") is True:
        return shard_event_extra(summary, output_root)
    if not summary.get("skipped"):
        return None  # registered concurrently by someone else: theirs to announce
    this = _task_instance(owner)
    if this is None or _task_instance(registered_by(registry, summary["recipe_id"], summary["shard"])) != this:
        return None
    row = registry.shard(summary["recipe_id"], summary["shard"]) or {}
    registered_at = datetime.fromisoformat(row["registered_at"].replace("Z", "+00:00"))
    if announced_before(registered_at - CLOCK_MARGIN):
        return None
    return shard_event_extra(summary, output_root)


__all__ = [
    "CLOCK_MARGIN",
    "EXTRA_FIELDS",
    "SHARDS_ASSET_NAME",
    "SHARDS_ASSET_URI",
    "announcement",
    "registered_by",
    "shard_event_extra",
    "task_instance_owner",
]
