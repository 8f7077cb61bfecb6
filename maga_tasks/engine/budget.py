"""The flat budget of a night, derived from the fleet: how many shards the `maga_llm`
pool's slots can publish in the hours a nightly run may take,

    budget = floor(pool slots x run hours / hours per shard),

where the hours per shard are the median wall time of the recipe's most recently
registered shards (`Registry.recent_shard_seconds`), or a fallback before enough of
them exist. A budget given as a number (`shards_per_run` > 0) is used as it is.

The budget is the night's, not one run's: a run maps at most Airflow's `max_map_length`
shards and the DAG continues with the rest of the budget in further runs
(`engine.continuation`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Literal

from maga_tasks.errors import EXIT_BAD_INPUT, MagaError
from maga_tasks.registry import Registry

# `shards_per_run` = AUTO: derive the budget from the fleet.
AUTO = 0
# A nightly run (02:00 UTC) may take until 10:00: the fleet is free for other work by day.
DEFAULT_RUN_HOURS = 8.0
# Hours per shard before a recipe has history: pessimistic for a 10,000-document shard
# on one GPU worker (SmolLM2-135M on an H100 takes about 0.3 h), so a first night ends in
# time; the nights after use the measured median.
FALLBACK_SHARD_HOURS = 1.0
# The history: the median over this many of the latest registered shards, once there
# are at least MIN_SAMPLES of them (fewer are noise: a first trial, a resumed shard).
RECENT_SHARDS = 50
MIN_SAMPLES = 3


class BudgetError(MagaError):
    """The budget parameters cannot give a number of shards."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class ShardHours:
    """The hours one shard task holds a pool slot, and where the figure comes from."""

    hours: float
    source: Literal["given", "history", "fallback"]
    samples: int = 0  # registered shards the median is over (history only)


@dataclass(frozen=True)
class NightBudget:
    """The shards a night may publish (`shards`), and how that number was reached."""

    shards: int
    derived: bool  # from the fleet (auto), not given
    slots: int | None = None
    run_hours: float | None = None
    shard_hours: ShardHours | None = None

    def summary(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if not self.derived:
            return f"budget {self.shards} shard(s) (shards_per_run)"
        estimate = self.shard_hours
        basis = (
            f"median of {estimate.samples} recent shard(s)" if estimate.source == "history"
            else "given" if estimate.source == "given" else "no history yet: fallback"
        )
        return (
            f"budget {self.shards} shard(s) = {self.slots} slot(s) x {self.run_hours:g} h"
            f" / {estimate.hours:.3f} h per shard ({basis})"
        )


def estimate_shard_hours(
    registry: Registry,
    recipe_id: str,
    *,
    recent: int = RECENT_SHARDS,
    min_samples: int = MIN_SAMPLES,
    fallback_hours: float = FALLBACK_SHARD_HOURS,
) -> ShardHours:
    """Hours per shard from the recipe's history (median wall time of its `recent` latest
    registered shards), or `fallback_hours` with fewer than `min_samples` of them."""
    seconds = registry.recent_shard_seconds(recipe_id, recent)
    if len(seconds) < max(min_samples, 1):
        return ShardHours(fallback_hours, "fallback", len(seconds))
    # A shard registered at once (its files were committed by an earlier try) takes no
    # measurable time; a floor of a second keeps the budget finite.
    return ShardHours(max(statistics.median(seconds), 1.0) / 3600, "history", len(seconds))


def fleet_budget(slots: int, run_hours: float, shard_hours: float) -> int:
    """Shards `slots` parallel shard tasks finish in `run_hours`: at least one."""
    if slots < 1:
        raise BudgetError(f"pool slots must be >= 1, got {slots}")
    if not run_hours > 0 or not shard_hours > 0:
        raise BudgetError(f"run_hours and shard_hours must be > 0, got {run_hours} and {shard_hours}")
    return max(1, math.floor(slots * run_hours / shard_hours + 1e-9))


def night_budget(
    shards_per_run: int,
    registry: Registry,
    recipe_id: str,
    *,
    slots: int,
    run_hours: float = DEFAULT_RUN_HOURS,
    shard_hours: float | None = None,
) -> NightBudget:
    """The night's flat budget: `shards_per_run` when given (> 0), else (AUTO) derived from
    the pool's `slots`, `run_hours` and `shard_hours` (None: from the recipe's history)."""
    if shards_per_run < 0:
        raise BudgetError(f"shards_per_run must be >= 0 (0: from the fleet), got {shards_per_run}")
    if shards_per_run != AUTO:
        return NightBudget(shards=shards_per_run, derived=False)
    estimate = (
        ShardHours(shard_hours, "given") if shard_hours is not None else estimate_shard_hours(registry, recipe_id)
    )
    return NightBudget(
        shards=fleet_budget(slots, run_hours, estimate.hours),
        derived=True,
        slots=slots,
        run_hours=run_hours,
        shard_hours=estimate,
    )


__all__ = [
    "AUTO",
    "DEFAULT_RUN_HOURS",
    "FALLBACK_SHARD_HOURS",
    "BudgetError",
    "NightBudget",
    "ShardHours",
    "estimate_shard_hours",
    "fleet_budget",
    "night_budget",
]
