"""Recipes and planned shards: which corpus versions exist and which of their shards are
known, before anyone works on them. What happens to a shard after (leases, progress,
registration, failure) is the shard store's (`store.py`), which builds on this."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from maga_tasks.registry import queries
from maga_tasks.registry.db import Database, iso, utc_now
from maga_tasks.registry.reads import RegistryReads

if TYPE_CHECKING:
    from maga_tasks.recipe import Recipe


class PlanStore:
    """The registry's writes of recipes and planned shards."""

    def __init__(self, db: Database):
        self.db = db

    # -- recipes -----------------------------------------------------------------------

    def ensure_recipe(self, recipe: Recipe) -> str:
        """Record a recipe (a corpus version) once; return its id."""
        with self.db.write() as conn:
            conn.execute(
                queries.INSERT_RECIPE,
                {
                    "rid": recipe.recipe_id,
                    "name": recipe.name,
                    "pv": recipe.prompt_version,
                    "model": recipe.model,
                    "pairs": recipe.pairs_per_document,
                    "yaml": recipe.to_yaml(),
                    "at": iso(utc_now()),
                },
            )
        return recipe.recipe_id

    # -- planning -------------------------------------------------------------------

    def plan(
        self,
        shards: Iterable[tuple[str, str]],
        recipe_id: str,
        *,
        limit: int | None = None,
        include_quarantined: bool = False,
        max_failures: int | None = None,
    ) -> list[tuple[str, str]]:
        """The `(source_uri, shard)` pairs that still need work, never-tried ones first,
        at most `limit`: not registered, not failed for good and (unless asked) not
        quarantined, since a quarantined shard waits for a person, not for the next run
        (`RegistryReads.triage`). The pairs returned are recorded as planned; one query
        reads the recipe's shards, so planning a corpus of many thousand shards stays cheap."""
        triage = RegistryReads(self.db).triage(
            shards, recipe_id, include_quarantined=include_quarantined, max_failures=max_failures
        )
        pending = triage.pending if limit is None else triage.pending[: max(limit, 0)]
        self.record_planned(recipe_id, pending)
        return pending

    def record_planned(self, recipe_id: str, shards: list[tuple[str, str]]) -> None:
        """Record `(source_uri, shard)` pairs as planned; shards already known keep their row."""
        if not shards:
            return
        now = iso(utc_now())
        with self.db.write() as conn:
            conn.execute(
                queries.PLAN_SHARD,
                [{"rid": recipe_id, "shard": shard, "uri": uri, "now": now} for uri, shard in shards],
            )
