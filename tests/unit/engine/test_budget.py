"""The flat night's budget derived from the fleet: pool slots x run hours / hours per
shard (the hours per shard from the registry's history, on SQLite and PostgreSQL:
tests/integration/test_budget.py)."""

from __future__ import annotations

import pytest

from maga_tasks.engine.budget import BudgetError, fleet_budget


def test_the_fleet_budget_is_slots_times_hours_over_hours_per_shard():
    # docs/operations.md's example fleet: 64 GPU workers, 0.3 h per 10,000-document shard, 8 h a night.
    assert fleet_budget(64, 8, 0.3) == 1706  # 20,000 shards in 12 nights
    assert fleet_budget(8, 8, 1.0) == 64
    assert fleet_budget(1, 1, 5.0) == 1  # a shard longer than the night still gets one
    for slots, hours, per_shard in ((0, 8, 1), (8, 0, 1), (8, 8, 0), (8, 8, -1)):
        with pytest.raises(BudgetError):
            fleet_budget(slots, hours, per_shard)
