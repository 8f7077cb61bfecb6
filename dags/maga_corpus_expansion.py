"""
# MAGA corpus expansion (nightly)

Expands the next shards of a pretraining corpus into MAGA reformulations and publishes
them as a new corpus version `{output_root}/{recipe_id}/`.

1. **wait_for_llm_workers**: a sensor in reschedule mode; done as soon as one vLLM
   endpoint answers `/health` (it frees its worker slot between pokes).
2. **plan_shards**: puts the shards named in `requeue` back, lists the source and picks
   the shards not yet registered for the recipe, never-tried ones first; a shard that
   failed `max_shard_failures` tries is failed for good and left out until requeued.
   `planning_mode=flat` takes the next shards of a flat corpus within the night's budget;
   `planning_mode=dated` takes the whole partition of the run's logical date (`{ds}` in
   `source`, or `partition_ds`), so a backfill over N dates processes exactly those N
   partitions. A run maps at most Airflow's `core.max_map_length` shards (1024): the rest
   of the budget or partition goes to continuation runs (5.). The flat budget,
   `shards_per_run`, is by default (0) derived from the fleet: `pool_slots` x `run_hours`
   / hours per shard (`shard_hours`, else the median wall time of the recipe's 50 latest
   registered shards, 1.0 h before 3 exist), e.g. 64 slots x 8 h / 0.3 h = 1,706 shards
   a night: a 20,000-shard corpus version in 13 nights (the first at the fallback).
3. **publish_shard** (mapped, one task per shard, named after the shard): expand
   (checkpointed, resumes after a crash) -> validate (Great Expectations gate) ->
   register or quarantine. Runs in the `maga_llm` pool; retried with exponential
   backoff; a shard that was already registered is a no-op. A shard it registers is
   announced once: an event on `maga://corpus/shards` with the shard's name as its
   partition key and its files, checksum and figures as extra (docs/operations.md,
   "Downstream DAGs per shard").
4. **summarize** (also when shards failed): logs the run report (failed shards by name,
   shards left in the corpus or partition) and emits an asset event
   `maga://corpus/{recipe_id}` (through the `maga-corpus` alias) carrying it, with the
   release manifest of the registered shards (data URI and checksum of each); rewrites
   the corpus's dataset card `{output_root}/{recipe_id}/README.md` (each registration
   does too).
5. **continue_run**: when the flat budget or the dated partition held more shards than
   one run maps, triggers a further run of this DAG (`continue__{ds|flat}__...`, named
   after this run) for the rest: the same partition, or the budget left; skipped
   otherwise, and when this run finished none of its shards.
6. **fail_if_shards_failed**: a watcher that runs only when a shard task failed and
   fails the run (the run's state comes from its last tasks, which ran all the same).

Configuration: the registry database comes from the Airflow connection `maga_registry`
(e.g. `AIRFLOW_CONN_MAGA_REGISTRY=postgresql://user:pass@host:5432/maga`; without it a
SQLite file `{output_root}/_registry.sqlite`), S3 from the connection `maga_s3` (type
`aws`: login/password = access key/secret, extra `endpoint_url`, `region_name`), the
vLLM endpoints from `MAGA_ENDPOINTS` and the connection `maga_llm` (its host; extra
`endpoints`, a list), the vLLM API key from `MAGA_API_KEY` or the password of that
connection, recipes by name from the Variable `maga_recipes_dir` (else `MAGA_RECIPES_DIR`)
or the built-in ones, and the folders or s3:// prefixes a conf's `source` and
`output_root` may lie in from `MAGA_DATA_ROOTS` (besides `MAGA_SOURCE` and
`MAGA_OUTPUT_ROOT`). A run's conf chooses among these, never beyond: an endpoint not
configured, a recipe path, a root outside the data roots or a bad shard name fails the
run before any request. Create
the pool once: `airflow pools set maga_llm 8 "vLLM request streams"` and give its size
to the budget as `pool_slots` (default `MAGA_POOL_SLOTS`, 8): Airflow 3 tasks cannot read
pools (the Task SDK and its execution API have no pool call; tasks have no metadata DB
access).

All the work is done by the `maga_tasks` library; this file only wires it into tasks.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta

from airflow.sdk import (
    Asset,
    AssetAlias,
    Metadata,
    Param,
    PokeReturnValue,
    dag,
    get_current_context,
    task,
)

# The shards asset's name, the shard tasks' decorator, and the params and the run settings
# table: constants, Airflow's own modules and pydantic only, no I/O (tests/unit/test_dags.py
# keeps parsing light).
from maga_tasks.engine.assets import SHARDS_ASSET_NAME, SHARDS_ASSET_URI
from maga_tasks.lineage import remember_shard, shard_task  # OpenLineage of the shard tasks
from maga_tasks.run_params import DEFAULT_OUTPUT_ROOT, DEFAULT_SOURCE, dag_params
from maga_tasks.settings import setting_default

DAG_ID = "maga_corpus_expansion"
POOL = "maga_llm"
REGISTRY_CONN_ID = "maga_registry"
S3_CONN_ID = "maga_s3"
LLM_CONN_ID = "maga_llm"
CORPUS_ALIAS = AssetAlias("maga-corpus")
# One event per registered shard, partition key = shard name (maga_tasks/engine/assets.py
# says why one asset for every corpus version); downstream DAGs schedule on it with
# PartitionedAssetTimetable (dags/maga_shard_token_count.py).
CORPUS_SHARDS = Asset(name=SHARDS_ASSET_NAME, uri=SHARDS_ASSET_URI, group="maga")

log = logging.getLogger(__name__)

# Deployment knobs read from the environment (cheap; no connection, no network).
RETRY_DELAY = timedelta(seconds=float(os.environ.get("MAGA_RETRY_DELAY_SECONDS", "120")))
SHARD_TIMEOUT = timedelta(minutes=float(os.environ.get("MAGA_SHARD_TIMEOUT_MINUTES", "360")))
HEALTH_POKE_SECONDS = float(os.environ.get("MAGA_HEALTH_POKE_SECONDS", "60"))
# A shard's lease; a retry waits up to this long for a killed try's lease to run out.
LEASE_TTL_SECONDS = float(os.environ.get("MAGA_LEASE_TTL_SECONDS") or setting_default("lease_ttl_s"))


PARAMS = {name: Param(**kwargs) for name, kwargs in dag_params(os.environ).items()}


# -- wiring helpers: Airflow connections -> library configuration ------------------------
# Called inside tasks only, so parsing this file never looks up a connection.


def _optional_connection(conn_id: str):
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _registry_url(output_root: str) -> str:
    """Registry database URL from the `maga_registry` connection, else a SQLite file."""
    conn = _optional_connection(REGISTRY_CONN_ID)
    if conn is None:
        if output_root.startswith("s3://"):
            raise ValueError(
                f"output_root is on S3: set the Airflow connection {REGISTRY_CONN_ID!r} "
                "(AIRFLOW_CONN_MAGA_REGISTRY) to a PostgreSQL database"
            )
        return os.path.join(output_root, "_registry.sqlite")
    from maga_tasks.registry import url_from_connection

    return url_from_connection(
        conn.conn_type, host=conn.host, login=conn.login, password=conn.password, port=conn.port, schema=conn.schema
    )


def _s3_endpoint_url() -> str | None:
    """Apply the `maga_s3` connection to boto3's environment; returns its endpoint URL.

    Credentials go into this task process's environment only (boto3 reads them there);
    without the connection boto3's own chain (env, profile, instance role) applies.
    """
    conn = _optional_connection(S3_CONN_ID)
    if conn is None:
        return os.environ.get("MAGA_S3_ENDPOINT_URL") or None
    extra = conn.extra_dejson
    if conn.login:
        os.environ["AWS_ACCESS_KEY_ID"] = conn.login
    if conn.password:
        os.environ["AWS_SECRET_ACCESS_KEY"] = conn.password
    if extra.get("region_name"):
        os.environ["AWS_DEFAULT_REGION"] = extra["region_name"]
    return extra.get("endpoint_url") or os.environ.get("MAGA_S3_ENDPOINT_URL") or None


def _recipes_dir() -> str | None:
    """The operator's recipes folder, read when a task runs: the Variable
    `maga_recipes_dir` (or AIRFLOW_VAR_MAGA_RECIPES_DIR), else MAGA_RECIPES_DIR."""
    from airflow.sdk import Variable

    return Variable.get("maga_recipes_dir", default=None) or os.environ.get("MAGA_RECIPES_DIR") or None


def _operator_endpoints() -> tuple[str, ...]:
    """The endpoints the operator configured: MAGA_ENDPOINTS and the `maga_llm` connection."""
    from maga_tasks.run_conf import configured_endpoints, connection_endpoints, split_endpoints

    conn = _optional_connection(LLM_CONN_ID)
    from_connection = (
        connection_endpoints(conn.conn_type, conn.host, conn.port, conn.schema, conn.extra_dejson) if conn else []
    )
    return configured_endpoints(split_endpoints(os.environ.get("MAGA_ENDPOINTS")), from_connection)


def _conf(params: dict):
    """(params, recipe) of this run with what its conf asks checked against what the
    operator configured (endpoints, recipe name, roots, shard names). A refusal fails
    the task at once, with one line and no retry, before any request."""
    from airflow.sdk.exceptions import AirflowFailException

    from maga_tasks.recipe import RecipeError
    from maga_tasks.run_conf import ConfRefused, checked_params, conf_recipe, operator_data_roots

    try:
        roots = operator_data_roots(os.environ, DEFAULT_SOURCE, DEFAULT_OUTPUT_ROOT)
        checked = checked_params(params, _operator_endpoints(), roots)
        return checked, conf_recipe(checked["recipe"], _recipes_dir(), os.environ.get("MAGA_RECIPE"))
    except (ConfRefused, RecipeError) as error:
        raise AirflowFailException(str(error)) from None


def _api_key() -> str | None:
    key = os.environ.get("MAGA_API_KEY")
    if not key:
        conn = _optional_connection(LLM_CONN_ID)
        key = conn.password if conn is not None else None
    if key:
        from airflow.sdk.log import mask_secret

        mask_secret(key)
    return key or None


def _run_settings(params: dict, **overrides):
    """Settings for the client from params `_conf` checked (endpoints already chosen)."""
    from maga_tasks.knobs import settings_from_params
    from maga_tasks.settings import RunSettings

    return RunSettings(
        endpoints=tuple(params["endpoints"]), api_key=_api_key(), **settings_from_params(params), **overrides
    )


def _plan_run(params: dict, ds: str | None, registry, recipe_id: str, **options):
    """`plan_run` with this run's source, mode, partition and failure limit."""
    from maga_tasks.engine.planning import plan_run

    return plan_run(
        params["source"],
        recipe_id,
        registry,
        mode=params["planning_mode"],
        ds=params["partition_ds"] or ds,
        max_failures=params["max_shard_failures"],
        s3_endpoint_url=_s3_endpoint_url(),
        **options,
    )


def _announced_by_task_instance(since: datetime) -> bool:
    """Whether Airflow holds an event on CORPUS_SHARDS from this task instance (any try)
    since `since`: a try's outlet events are recorded only when it succeeds."""
    context = get_current_context()
    ti = context["ti"]
    this = (ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    events = context["inlet_events"][CORPUS_SHARDS].after(since)
    return any((e.source_dag_id, e.source_run_id, e.source_task_id, e.source_map_index) == this for e in events)


def _show_library_logs() -> None:
    """Route the library's progress lines (stdlib logger "maga_tasks") to the task log."""
    logging.getLogger("maga_tasks").setLevel(logging.INFO)


@dag(
    dag_id=DAG_ID,
    schedule="0 2 * * *",
    start_date=datetime(2024, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["maga", "llm", "corpus-expansion"],
    params=PARAMS,
    default_args={
        "owner": "maga",
        "retries": 3,
        "retry_delay": RETRY_DELAY,
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(hours=1),
        "execution_timeout": timedelta(minutes=30),
    },
)
def maga_corpus_expansion():
    # Retries cover a passing fault of the poke itself; waiting for the workers is
    # bounded by the sensor timeout, which fails without retrying.
    @task.sensor(
        poke_interval=HEALTH_POKE_SECONDS,
        timeout=6 * 3600,
        mode="reschedule",
        retries=2,
        execution_timeout=None,
    )
    def wait_for_llm_workers(params: dict) -> PokeReturnValue:
        """Done once a vLLM endpoint answers /health and serves the recipe's model to our
        key with room for the recipe; a fleet that refuses the run fails the sensor."""
        import asyncio

        from maga_tasks.errors import EndpointsUnavailable, FleetRefused
        from maga_tasks.llm.client import LLMClient

        params, recipe = _conf(params)

        async def healthy() -> list[str]:
            settings = _run_settings(params)
            async with LLMClient(settings, model=recipe.model, model_revision=recipe.model_revision) as client:
                return await client.wait_ready(timeout_s=0, min_context_tokens=recipe.required_context_tokens)

        try:
            ready = asyncio.run(healthy())
        except FleetRefused:
            raise  # a configuration fault: waiting longer will not fix it
        except EndpointsUnavailable as error:
            log.info("LLM workers not ready yet: %s", error)
            return PokeReturnValue(is_done=False)
        log.info("%d/%d LLM endpoints healthy: %s", len(ready), len(params["endpoints"]), ", ".join(ready))
        return PokeReturnValue(is_done=True, xcom_value=ready)

    @task
    def plan_shards(params: dict, ds: str | None = None) -> list[dict]:
        """The shards this run publishes: the requeued and unregistered ones, within the
        flat night's budget or the whole dated partition, at most Airflow's max_map_length.
        The night's budget goes to the XCom `budget` (summarize counts what is left of it)."""
        from airflow.sdk import conf

        from maga_tasks.engine.budget import night_budget
        from maga_tasks.engine.requeue import requeue_shards
        from maga_tasks.registry import Registry

        params, recipe = _conf(params)
        registry = Registry(_registry_url(params["output_root"]))
        registry.upgrade()
        registry.ensure_recipe(recipe)
        if params["requeue"]:
            for item in requeue_shards(
                registry, params["output_root"], recipe.recipe_id, params["requeue"], _s3_endpoint_url()
            ):
                log.log(logging.INFO if item["requeued"] else logging.WARNING, "requeue %s", item)
        budget = {"shards": None}  # dated: the whole partition
        if params["planning_mode"] == "flat":
            night = night_budget(
                params["shards_per_run"], registry, recipe.recipe_id,
                slots=params["pool_slots"], run_hours=params["run_hours"], shard_hours=params["shard_hours"],
            )
            log.info("flat corpus: %s", night.describe())
            budget = night.summary()
        # The plan is cut to what the api-server lets one run map *before* its shards are
        # recorded as planned, so the XCom push below cannot refuse a plan it has recorded.
        # (Give the api-server and the workers the same core.max_map_length.)
        plan = _plan_run(
            params, ds, registry, recipe.recipe_id,
            budget=budget["shards"], max_shards=conf.getint("core", "max_map_length"),
        )
        get_current_context()["ti"].xcom_push(key="budget", value=budget)
        names = [s["shard"] for s in plan.shards]
        log.info("recipe %s: %d shard(s) to publish: %s", recipe.recipe_id, len(names), names)
        return [{**s, "recipe_id": recipe.recipe_id} for s in plan.shards]

    @shard_task(
        pool=POOL,
        map_index_template="{{ task.op_kwargs['shard']['shard'] }}",
        execution_timeout=SHARD_TIMEOUT,
        # The shard it registers is announced on CORPUS_SHARDS; the inlet only lets a
        # retry read back whether an earlier try of this task instance already did.
        inlets=[CORPUS_SHARDS],
        outlets=[CORPUS_SHARDS],
    )
    def publish_shard(shard: dict, params: dict) -> dict:
        """Expand -> validate -> register one shard and announce it (an asset event,
        partition key = shard name) when registered; returns its summary (no text)."""
        from airflow.sdk.exceptions import AirflowFailException

        from maga_tasks.engine.assets import announcement, task_instance_owner
        from maga_tasks.engine.publish import publish_shard as publish
        from maga_tasks.errors import ShardFailedForGood
        from maga_tasks.registry import Registry

        _show_library_logs()
        params, recipe = _conf(params)
        if recipe.recipe_id != shard["recipe_id"]:
            raise ValueError(
                f"recipe changed since planning ({shard['recipe_id']} -> {recipe.recipe_id}); rerun the DAG"
            )
        context = get_current_context()
        ti = context["ti"]
        # One owner per try: a retry never shares the lease of a try that may still run
        # (a zombie); it takes the shard over once that lease expires, fencing it out.
        owner = task_instance_owner(ti.dag_id, ti.task_id, ti.map_index, ti.run_id, ti.try_number)
        registry = Registry(_registry_url(params["output_root"]))
        try:
            summary = publish(
                shard["source_uri"],
                params["output_root"],
                recipe,
                _run_settings(params, s3_endpoint_url=_s3_endpoint_url()),
                registry,
                owner=owner,
                lease_ttl_s=LEASE_TTL_SECONDS,
                lease_wait_s=LEASE_TTL_SECONDS,
                shard=shard["shard"],
                max_docs=params["max_docs_per_shard"],
                judge_sample=params["judge_sample_per_shard"],
            )
        except ShardFailedForGood as error:  # retrying will not help: fail without retries
            raise AirflowFailException(str(error)) from error
        remember_shard(context, summary, recipe, registry)  # for its OpenLineage events, when configured
        extra = announcement(
            summary, output_root=params["output_root"], registry=registry, owner=owner,
            announced_before=_announced_by_task_instance,
        )
        if extra is None:
            # Airflow records an event (without partition) for every outlet of a task that
            # succeeds: a try that announces nothing (a no-op, a quarantine) has no outlet.
            context["task"].outlets = []
        else:
            events = context["outlet_events"][CORPUS_SHARDS]
            events.extra.update(extra)
            events.add_partitions(summary["shard"])
        return summary

    # all_done: the report names the shards that failed and the others are still released.
    # One at a time across runs: the first event of a new recipe's asset creates it, and two
    # runs creating it at once (a backfill) fail one of them on the unique key.
    @task(trigger_rule="all_done", outlets=[CORPUS_ALIAS], max_active_tis_per_dag=1)
    def summarize(results, planned: list[dict], budget: dict, params: dict, ds: str | None = None):
        """Log the run report, rewrite the corpus's dataset card and emit the corpus asset
        event carrying the report."""
        from maga_tasks.engine.card import refresh_card
        from maga_tasks.engine.report import run_report
        from maga_tasks.registry import Registry

        params, recipe = _conf(params)
        registry = Registry(_registry_url(params["output_root"]))
        extra = run_report(
            results[:],  # every shard's result in one request (a slice), not one per shard
            registry,
            recipe.recipe_id,
            planned=planned,
            after=_plan_run(params, ds, registry, recipe.recipe_id, record=False),
            budget=budget["shards"],
        )
        if params["max_docs_per_shard"]:  # a trial run leaves the corpus unchanged: no asset event
            return extra
        # The card's figures as the run leaves them (a later registration may have raced it).
        refresh_card(params["output_root"], recipe, registry, s3_endpoint_url=_s3_endpoint_url())
        yield Metadata(Asset(f"maga://corpus/{recipe.recipe_id}", group="maga"), extra=extra, alias=CORPUS_ALIAS)
        return extra

    @task
    def continue_run(report: dict, params: dict, run_id: str):
        """Trigger a further run for the rest of the partition or of the night's budget,
        when this run could not map it whole."""
        from airflow.sdk.exceptions import AirflowSkipException, DagRunTriggerException

        from maga_tasks.engine.continuation import continuation

        further = continuation(report, params, run_id)
        if further is None:
            raise AirflowSkipException(f"nothing to continue ({report.get('left', 0)} shard(s) left)")
        log.info("%s; triggering %s", further.note, further.run_id)
        raise DagRunTriggerException(
            trigger_dag_id=DAG_ID,
            dag_run_id=further.run_id,
            conf=further.conf,
            logical_date=None,
            reset_dag_run=False,
            skip_when_already_exists=True,  # a retry of this task finds the run it started
            wait_for_completion=False,
            allowed_states=["success"],
            failed_states=["failed"],
            poke_interval=60,
            deferrable=False,
            note=further.note,
        )

    # The watcher pattern: without it a run whose shards failed would end as a success.
    @task(trigger_rule="one_failed", retries=0)
    def fail_if_shards_failed():
        """Fail the run: a shard task failed (summarize's report names it)."""
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("a shard task failed; summarize's run report names the shards and their errors")

    ready = wait_for_llm_workers()
    planned = plan_shards()
    ready >> planned
    published = publish_shard.expand(shard=planned)
    continue_run(summarize(published, planned, planned["budget"]))
    published >> fail_if_shards_failed()


maga_corpus_expansion()
