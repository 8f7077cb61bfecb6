"""Continuing past what one run maps: a run maps at most Airflow's `max_map_length`
shards; when its flat budget or its dated partition holds more, a further run of the DAG
publishes the rest. One mechanism for both planning modes:

- the decision (`should_continue`): shards were held back by the run's limit, the run
  finished some of its own (so a chain ends even when every try fails), and, flat, some of
  the night's budget is left;
- the request (`continuation`): the further run's id, named after the run that asks for it
  (a retry of the asking task finds that run and starts no second one), and its conf: the
  same params with the partition (dated) or the budget left (flat) and nothing to requeue.

A continuation publishes nothing twice: its plan skips what the registry holds as registered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from maga_tasks.engine.planning import RunPlan


def budget_left(budget: int | None, planned: list[dict]) -> int | None:
    """What a flat night's budget leaves after this run's shards (None: no budget)."""
    return None if budget is None else max(budget - len(planned), 0)


def should_continue(planned: list[dict], after: RunPlan, *, budget_left: int | None = None) -> bool:
    """True when a further run must go on with this run's corpus or partition: shards not
    in this run are still to do, this run finished some of its own, and (flat) the night's
    budget is not spent (`budget_left` > 0; None: a flat run never continues)."""
    names, pending = {d["shard"] for d in planned}, set(after.pending)
    held_back, progressed = bool(pending - names), bool(names - pending)
    if after.mode == "flat" and not (budget_left or 0) > 0:
        return False
    return held_back and progressed


@dataclass(frozen=True)
class Continuation:
    """A further run of the DAG: its run id, conf and the note shown in the UI."""

    run_id: str
    conf: dict
    note: str


def continuation(report: dict, params: dict, run_id: str) -> Continuation | None:
    """The further run a run's report asks for (`report["continue"]`), else None."""
    if not report.get("continue"):
        return None
    dated = report["mode"] == "dated"
    scope = report["ds"] if dated else "flat"
    # Named after this run: a retry of the asking task cannot start a second continuation.
    name = f"continue__{scope}__{hashlib.sha1(run_id.encode()).hexdigest()[:12]}"
    overrides = {"partition_ds": report["ds"]} if dated else {"shards_per_run": report["budget_left"]}
    what = f"partition {report['ds']}" if dated else f"the night's budget ({report['budget_left']} shard(s) left)"
    return Continuation(
        run_id=name,
        conf={**dict(params), **overrides, "requeue": []},
        note=f"continues {what} after {run_id}: {report['pending']} shard(s) to publish",
    )


__all__ = ["Continuation", "budget_left", "continuation", "should_continue"]
