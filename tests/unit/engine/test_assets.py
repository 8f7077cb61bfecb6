"""The per-shard announcement (engine.assets) and the example consumer's token count
(engine.token_count), on a registry on SQLite and PostgreSQL and real committed files.
Under Airflow's scheduler: tests/e2e/test_shard_partitions.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.outcome import ShardResult
from maga_tasks.engine.assets import EXTRA_FIELDS, announcement, registered_by, task_instance_owner
from maga_tasks.recipe import load_recipe
from tests.support.shards import committed_source

RECIPE = load_recipe()
RID = RECIPE.recipe_id
SHARD = "part-0000"


def owner(run_id: str = "scheduled__2025-01-01", try_number: int = 1, map_index: int = 0) -> str:
    return task_instance_owner("maga_corpus_expansion", "publish_shard", map_index, run_id, try_number)


@pytest.fixture
def committed(tmp_path):
    source, out = committed_source(tmp_path, documents=4)
    return source, out


def _register(registry, source: str, out: str, lease_owner: str | None) -> dict:
    """Register the committed shard under a lease of `lease_owner` (None: without a
    lease, as `maga register-shard`); the summary a shard task would return."""
    from maga_tasks.data.committed import files_checksum

    paths = shard_paths(out, RID, SHARD)
    data, rejected = pq.read_table(paths.data), pq.read_table(paths.rejected)
    result = ShardResult(
        SHARD, source, RID, paths.data, paths.rejected, documents=4, accepted=data.num_rows,
        rejected=rejected.num_rows, completion_tokens=123,
    )
    checksum = files_checksum(Path(paths.data), Path(paths.rejected))
    registry.ensure_recipe(RECIPE)
    token = registry.lease(RID, SHARD, source, lease_owner, 60) if lease_owner else None
    assert registry.register(RID, SHARD, result, checksum, token=token)
    return {
        "shard": SHARD, "source_uri": source, "recipe_id": RID, "status": "registered", "data_uri": paths.data,
        "rejected_uri": paths.rejected, "documents": 4, "accepted": data.num_rows, "rejected": rejected.num_rows,
        "prompt_tokens": 0, "completion_tokens": 123, "expansion_ratio": 0.0, "checksum": checksum,
        "newly_registered": True,
    }


def never(since: datetime) -> bool:
    raise AssertionError("Airflow's events are read only on the crash-retry path")


def test_a_newly_registered_shard_is_announced_with_its_files_checksum_and_figures(registry, committed):
    source, out = committed
    summary = _register(registry, source, out, owner())
    extra = announcement(summary, output_root=out, registry=registry, owner=owner(), announced_before=never)
    assert set(extra) == set(EXTRA_FIELDS)
    assert extra["corpus_uri"] == f"{out}/{RID}" and extra["checksum"] == summary["checksum"]
    assert extra["data_uri"] == summary["data_uri"] and extra["completion_tokens"] == 123
    json.dumps(extra)  # an asset event's extra is JSON


@pytest.mark.parametrize("status", ["quarantined", "trial"])
def test_quarantined_shards_and_trials_are_not_announced(registry, status):
    summary = {"shard": SHARD, "recipe_id": RID, "status": status, "newly_registered": True}
    assert announcement(summary, output_root="/out", registry=registry, owner=owner(), announced_before=never) is None


def test_a_shard_found_registered_by_another_run_is_not_announced(registry, committed):
    source, out = committed
    registered = _register(registry, source, out, owner(run_id="scheduled__2024-12-31"))
    noop = {k: v for k, v in registered.items() if k != "newly_registered"} | {"skipped": True}
    assert announcement(noop, output_root=out, registry=registry, owner=owner(), announced_before=never) is None


def test_a_shard_registered_without_a_lease_has_no_registering_owner(registry, committed):
    """As by an operator's `maga register-shard`: no task instance announces it."""
    source, out = committed
    registered = _register(registry, source, out, None)
    assert registered_by(registry, RID, SHARD) is None
    noop = registered | {"newly_registered": False, "skipped": True}
    assert announcement(noop, output_root=out, registry=registry, owner=owner(), announced_before=never) is None


def test_the_retry_after_a_crash_between_register_and_success_announces_once(registry, committed):
    """Try 1 registered and died before its success (no event in Airflow): try 2 finds
    the shard registered by try 1 of the same task instance and announces it. A later
    clear of the succeeded task finds try 2's event and announces nothing."""
    source, out = committed
    registered = _register(registry, source, out, owner(try_number=1))
    assert registered_by(registry, RID, SHARD) == owner(try_number=1)
    noop = {k: v for k, v in registered.items() if k != "newly_registered"} | {"skipped": True}
    asked = []

    def no_event_yet(since: datetime) -> bool:
        asked.append(since)
        return False

    extra = announcement(noop, output_root=out, registry=registry, owner=owner(try_number=2),
                         announced_before=no_event_yet)
    assert extra is not None and extra["shard"] == SHARD
    registered_at = datetime.fromisoformat(registry.shard(RID, SHARD)["registered_at"].replace("Z", "+00:00"))
    assert len(asked) == 1 and asked[0] < registered_at <= datetime.now(UTC)
    assert announcement(noop, output_root=out, registry=registry, owner=owner(try_number=3),
                        announced_before=lambda since: True) is None
    # Another map index of the same run is another task instance.
    assert announcement(noop, output_root=out, registry=registry, owner=owner(try_number=2, map_index=1),
                        announced_before=never) is None


def test_token_count_matches_the_registry_and_refuses_changed_files(registry, committed, tmp_path):
    from maga_tasks.engine.publish import register_committed_shard
    from maga_tasks.engine.token_count import ShardChanged, count_shard_tokens

    source, out = committed
    summary = register_committed_shard(source, out, RECIPE, registry) | {"newly_registered": True}
    extra = announcement(summary, output_root=out, registry=registry, owner=owner(), announced_before=never)
    row = registry.shard(RID, SHARD)

    count = count_shard_tokens(extra)
    assert count["uri"] == f"{out}/_token_counts/{RID}/{SHARD}.json"
    assert json.loads(Path(count["uri"]).read_text())["completion_tokens"] == row["completion_tokens"] > 0
    assert count["rows"] == row["accepted"] and count["checksum"] == row["checksum"]
    data = pq.read_table(row["data_uri"])
    assert count["accepted_completion_tokens"] == sum(data.column("completion_tokens").to_pylist()) > 0

    elsewhere = count_shard_tokens(extra, counts_root=str(tmp_path / "counts"))
    assert elsewhere["uri"] == str(tmp_path / "counts" / RID / f"{SHARD}.json")
    with pytest.raises(ShardChanged, match="not the announced"):
        count_shard_tokens(extra | {"checksum": "0" * 64})
