"""The DAG's params: what a run's conf may set, each with its default, type, bounds and
description, declared as data (`Param(**kwargs)` in the DAG). Light on purpose: the DAG
file reads it at parse time, so no connection, no network and no heavy import here.
Whatever a conf sets is then checked against the operator's configuration by
`run_conf.checked_params`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from maga_tasks.knobs import param_kwargs

# Where a deployment that sets no MAGA_SOURCE / MAGA_OUTPUT_ROOT keeps its corpus.
DEFAULT_SOURCE = "/data/maga/source"
DEFAULT_OUTPUT_ROOT = "/data/maga/expanded"


def _param(default: Any, **schema: Any) -> dict[str, Any]:
    return {"default": default, **schema}


def dag_params(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """`Param(**kwargs)` keyword arguments of every DAG param, defaults from `environ`
    (the operator's MAGA_* variables) where the param has one."""
    environ = os.environ if environ is None else environ
    return {
        "source": _param(
            environ.get("MAGA_SOURCE", DEFAULT_SOURCE),
            type="string",
            minLength=1,
            description="Source corpus: a directory or s3:// prefix of parquet/jsonl shards; "
            "in dated mode a template with {ds}, e.g. s3://corpus/drops/{ds}/",
        ),
        "output_root": _param(
            environ.get("MAGA_OUTPUT_ROOT", DEFAULT_OUTPUT_ROOT),
            type="string",
            minLength=1,
            description="Where corpus versions are written: {output_root}/{recipe_id}/",
        ),
        "recipe": _param(
            None,
            type=["null", "string"],
            description="Recipe name (not a path): {name}.yaml in the operator's recipes folder "
            "(Variable maga_recipes_dir, else MAGA_RECIPES_DIR), else a built-in one (default, tiny, "
            "smollm2-135m); empty: the operator's MAGA_RECIPE, else the built-in default",
        ),
        "planning_mode": _param(
            environ.get("MAGA_PLANNING_MODE", "flat"),
            type="string",
            enum=["flat", "dated"],
            description="flat: the next shards of a flat corpus within the night's budget; "
            "dated: the whole {ds} partition",
        ),
        "shards_per_run": _param(
            0,
            type="integer",
            minimum=0,
            description="Flat mode: shards a night publishes (continued past max_map_length); "
            "0: from the fleet, pool_slots x run_hours / hours per shard",
        ),
        "pool_slots": _param(
            int(environ.get("MAGA_POOL_SLOTS", "8")),
            type="integer",
            minimum=1,
            description="Slots of the maga_llm pool, for the fleet budget (default MAGA_POOL_SLOTS); "
            "tasks cannot read pools in Airflow 3: keep it equal to the pool",
        ),
        "run_hours": _param(
            8.0, type="number", exclusiveMinimum=0, description="Fleet budget: hours a night's runs may take"
        ),
        "shard_hours": _param(
            None,
            type=["null", "number"],
            exclusiveMinimum=0,
            description="Fleet budget: hours per shard; empty: the median of the recipe's latest "
            "registered shards (1.0 before 3 exist)",
        ),
        "partition_ds": _param(
            None,
            type=["null", "string"],
            pattern=r"^\d{4}-\d{2}-\d{2}$",
            description="Dated mode: the partition (YYYY-MM-DD) when not the run's logical date "
            "(continuation runs set it)",
        ),
        "max_shard_failures": _param(
            3, type="integer", minimum=1,
            description="Failed tries after which a shard is failed for good (until requeued)",
        ),
        "requeue": _param(
            [],
            type="array",
            items={"type": "string", "minLength": 1},
            description=(
                "Quarantined or failed shards to put back before planning (their old output moves under _quarantine/)"
            ),
        ),
        "max_docs_per_shard": _param(
            None,
            type=["null", "integer"],
            minimum=1,
            description=(
                "Trial run: the first N documents of each shard, under {output_root}/_trials/first-N/, not registered"
            ),
        ),
        "judge_sample_per_shard": _param(
            0,
            type="integer",
            minimum=0,
            description="Rewrites of each newly registered shard scored by the LLM judge (0: no judge)",
        ),
        "endpoints": _param(
            [],
            type="array",
            items={"type": "string", "pattern": "^https?://"},
            description="vLLM base URLs this run uses, among those the operator configured (MAGA_ENDPOINTS, "
            "connection maga_llm); empty: all of them. Any other URL refuses the run: the API key goes "
            "to configured hosts only",
        ),
        # The run settings a conf may set (served_model, max_concurrency, adaptive_concurrency,
        # progress_interval_s, max_shard_failures, data_docs_sample_rate): each declared once,
        # with its default, bounds and description, in maga_tasks/settings.py.
        # The run settings a conf may set (served_model, max_concurrency, ...): each
        # declared once, with its default, bounds and description, in maga_tasks/settings.py.
        **param_kwargs(environ),
    }
