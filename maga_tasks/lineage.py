"""OpenLineage for the shard tasks: the source shard a `publish_shard` task read, the
files it wrote and what they amount to, through Airflow's OpenLineage provider.

Mechanism: operator-level facets. `shard_task` is `@task` with an operator that has the
provider's `get_openlineage_facets_on_start/complete/failure` methods, which the
provider's default extractor calls for the task's own START, COMPLETE and FAIL events.
Chosen over
- a custom extractor (`[openlineage] extractors`): it is keyed on the operator class,
  which for TaskFlow is the one class behind every `@task` of the deployment, and it is
  one more setting each deployment must carry;
- hook-level lineage: it carries datasets only, no facets of ours;
- the provider's `emit_dataset_lineage`: it sends an extra RUNNING event from the task's
  own code path; here the COMPLETE event itself carries inputs, outputs and facets.
The provider calls these methods and sends the events in a child process it forks at the
task's start and end, bounded by `[openlineage] execution_timeout` (10 s) and with every
error logged, never raised: a lineage backend that is down cannot fail a shard (tested
with one that answers 500). With no transport configured the provider is disabled and
none of this runs (`remember_shard` does not even read the registry).

The figures come from the registry (what the shard's row and the recipe say once the
task decided it), read by the task itself through `remember_shard`, where its registry
connection is at hand; the events are built from that record (`lineage_facets`).

Nothing here is imported from the provider or the OpenLineage client at import time:
the DAG file imports this module while parsing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk.bases.decorator import task_decorator_factory

if TYPE_CHECKING:
    from maga_tasks.recipe import Recipe
    from maga_tasks.registry import Registry

log = logging.getLogger(__name__)


class ShardTaskOperator(_PythonDecoratedOperator):
    """A TaskFlow task over one shard descriptor (`op_kwargs["shard"]`: `source_uri`,
    `shard`, `recipe_id`) whose OpenLineage events describe that shard."""

    # The record `remember_shard` leaves on the running task (None until then).
    shard_record: dict | None = None

    def _descriptor(self) -> dict:
        return (self.op_kwargs or {}).get("shard") or {}

    def get_openlineage_facets_on_start(self):
        from maga_tasks.lineage_facets import shard_lineage

        return shard_lineage(self._descriptor(), None)

    def get_openlineage_facets_on_complete(self, task_instance):  # noqa: ARG002 - the provider's signature
        from maga_tasks.lineage_facets import shard_lineage

        return shard_lineage(self._descriptor(), self.shard_record)

    def get_openlineage_facets_on_failure(self, task_instance):  # noqa: ARG002
        from maga_tasks.lineage_facets import shard_lineage

        return shard_lineage(self._descriptor(), None)


def shard_task(python_callable=None, **kwargs):
    """`@task` for a shard task (`ShardTaskOperator`): the same arguments."""
    return task_decorator_factory(python_callable=python_callable, decorated_operator_class=ShardTaskOperator, **kwargs)


def lineage_active() -> bool:
    """Whether the OpenLineage provider is installed and enabled (it is disabled, and
    emits nothing, until a transport is configured)."""
    try:
        from airflow.providers.openlineage import conf
    except ImportError:  # the provider is optional
        return False
    return not conf.is_disabled()


def remember_shard(context: Any, summary: dict, recipe: Recipe, registry: Registry) -> None:
    """Keep what the shard task's COMPLETE event says about the shard: its registry row
    and recipe with the task's `summary` (`ShardOutcome.to_dict`). Does nothing when
    lineage is off; a failure is logged, never raised (the shard is published already)."""
    try:
        if not lineage_active():
            return
        from maga_tasks.lineage_facets import shard_record

        row = registry.shard(summary["recipe_id"], summary["shard"]) if summary.get("status") != "trial" else None
        context["task"].shard_record = shard_record(summary, recipe, row)
    except Exception as error:  # lineage must never fail a published shard
        log.warning("shard %s: no OpenLineage facets (%s: %s)", summary.get("shard"), type(error).__name__, error)


__all__ = ["ShardTaskOperator", "lineage_active", "remember_shard", "shard_task"]
