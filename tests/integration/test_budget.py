"""The flat night's budget derived from the fleet, on SQLite and PostgreSQL: the hours per
shard from the median wall time of the recipe's latest registered shards (a fallback
before there are enough of them), the budget a given or derived number (pool slots x run
hours / hours per shard on its own: tests/unit/engine/test_budget.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from maga_tasks.engine.budget import AUTO, FALLBACK_SHARD_HOURS, BudgetError, estimate_shard_hours, night_budget
from maga_tasks.engine.shard import ShardResult
from maga_tasks.registry import iso

RID = "recipe-new"


def _register(registry, minutes: list[float], recipe_id: str = RID) -> None:
    """Register one shard per entry as a shard task does (lease, then register under its
    token), then date its registering try: it started `minutes` before its registration,
    the shards one hour apart in list order (the last one newest)."""
    for i in range(len(minutes)):
        shard = f"part-{i:04d}"
        token = registry.lease(recipe_id, shard, f"/src/{shard}.parquet", "w", 60)
        result = ShardResult(shard, f"/src/{shard}.parquet", recipe_id, f"/out/data/{shard}.parquet",
                             f"/out/rejected/{shard}.parquet", documents=10, accepted=40)
        assert registry.register(recipe_id, shard, result, f"sha-{shard}", token=token)
    with registry.db.write() as conn:
        for i, wall in enumerate(minutes):
            registered_at = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(hours=i)
            started_at = registered_at - timedelta(minutes=wall)
            conn.execute(
                text("UPDATE shards SET started_at = :s, registered_at = :r WHERE recipe_id = :rid AND shard = :shard"),
                {"s": iso(started_at), "r": iso(registered_at), "rid": recipe_id, "shard": f"part-{i:04d}"},
            )


def test_a_new_recipe_uses_the_fallback_and_a_given_budget_is_kept(registry):
    estimate = estimate_shard_hours(registry, RID)
    assert (estimate.hours, estimate.source, estimate.samples) == (FALLBACK_SHARD_HOURS, "fallback", 0)
    auto = night_budget(AUTO, registry, RID, slots=8, run_hours=8)
    assert auto.derived and auto.shards == 64 and auto.shard_hours.source == "fallback"
    assert "no history yet" in auto.describe()
    given_hours = night_budget(AUTO, registry, RID, slots=64, run_hours=8, shard_hours=0.3)
    assert given_hours.shards == 1706 and given_hours.shard_hours.source == "given"
    fixed = night_budget(12, registry, RID, slots=64, run_hours=8)
    assert (fixed.shards, fixed.derived, fixed.shard_hours) == (12, False, None)
    with pytest.raises(BudgetError, match="shards_per_run"):
        night_budget(-1, registry, RID, slots=8)


def test_hours_per_shard_are_the_median_of_the_latest_registered_shards(registry):
    # Two registered shards are not enough history yet.
    _register(registry, [30, 6])
    assert estimate_shard_hours(registry, RID).source == "fallback"
    assert sorted(registry.recent_shard_seconds(RID)) == [360.0, 1800.0]

    # Five more: the median of the latest five is over [6, 12, 18, 18, 24] minutes; an
    # outlier (600 min: a shard registered by hand long after its lease) does not move it.
    other = "recipe-with-history"
    _register(registry, [600, 6, 12, 18, 18, 24], other)
    assert registry.recent_shard_seconds(other, 3) == [1440.0, 1080.0, 1080.0]  # newest first
    estimate = estimate_shard_hours(registry, other)
    assert (estimate.source, estimate.samples) == ("history", 6) and estimate.hours == pytest.approx(0.3)
    assert estimate_shard_hours(registry, other, recent=5).hours == pytest.approx(0.3)
    night = night_budget(AUTO, registry, other, slots=64, run_hours=8)
    assert night.shards == 1706 and "median of 6 recent shard(s)" in night.describe()
    # Another recipe's history is not this one's.
    assert estimate_shard_hours(registry, RID).samples == 2
