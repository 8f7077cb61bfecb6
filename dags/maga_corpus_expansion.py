"""
# MAGA corpus expansion (nightly)

Expands the next shards of a pretraining corpus into MAGA reformulations and publishes
them as a new corpus version `{output_root}/{recipe_id}/`.

1. **wait_for_llm_workers**: a sensor in reschedule mode; done as soon as one vLLM
   endpoint answers `/health` (it frees its worker slot between pokes).
2. **plan_shards**: lists the source and picks the shards not yet registered for the
   recipe. `planning_mode=flat` takes the next `shards_per_run` shards of a flat corpus;
   `planning_mode=dated` reads the partition of the run's logical date (`{ds}` in
   `source`), so a backfill over N dates processes exactly those N partitions.
3. **publish_shard** (mapped, one task per shard, named after the shard): expand
   (checkpointed, resumes after a crash) -> validate (Great Expectations gate) ->
   register or quarantine. Runs in the `maga_llm` pool; retried with exponential
   backoff; a shard that was already registered is a no-op.
4. **summarize**: logs the recipe's totals and emits an asset event
   `maga://corpus/{recipe_id}` (through the `maga-corpus` alias) carrying them.

Configuration: the registry database comes from the Airflow connection `maga_registry`
(e.g. `AIRFLOW_CONN_MAGA_REGISTRY=postgresql://user:pass@host:5432/maga`; without it a
SQLite file `{output_root}/_registry.sqlite`), S3 from the connection `maga_s3` (type
`aws`: login/password = access key/secret, extra `endpoint_url`, `region_name`), the
vLLM API key from `MAGA_API_KEY` or the password of the connection `maga_llm`. Create
the pool once: `airflow pools set maga_llm 8 "vLLM request streams"`.

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

DAG_ID = "maga_corpus_expansion"
POOL = "maga_llm"
REGISTRY_CONN_ID = "maga_registry"
S3_CONN_ID = "maga_s3"
LLM_CONN_ID = "maga_llm"
CORPUS_ALIAS = AssetAlias("maga-corpus")

log = logging.getLogger(__name__)

# Deployment knobs read from the environment (cheap; no connection, no network).
RETRY_DELAY = timedelta(seconds=float(os.environ.get("MAGA_RETRY_DELAY_SECONDS", "120")))
SHARD_TIMEOUT = timedelta(minutes=float(os.environ.get("MAGA_SHARD_TIMEOUT_MINUTES", "360")))
HEALTH_POKE_SECONDS = float(os.environ.get("MAGA_HEALTH_POKE_SECONDS", "60"))


def _default_endpoints() -> list[str]:
    raw = os.environ.get("MAGA_ENDPOINTS", "http://127.0.0.1:8000")
    return [url.strip() for url in raw.split(",") if url.strip()]


PARAMS = {
    "source": Param(
        os.environ.get("MAGA_SOURCE", "/data/maga/source"),
        type="string",
        minLength=1,
        description="Source corpus: a directory or s3:// prefix of parquet/jsonl shards; "
        "in dated mode a template with {ds}, e.g. s3://corpus/drops/{ds}/",
    ),
    "output_root": Param(
        os.environ.get("MAGA_OUTPUT_ROOT", "/data/maga/expanded"),
        type="string",
        minLength=1,
        description="Where corpus versions are written: {output_root}/{recipe_id}/",
    ),
    "recipe": Param(
        os.environ.get("MAGA_RECIPE") or None,
        type=["null", "string"],
        description="Recipe YAML path; empty for the built-in default recipe",
    ),
    "planning_mode": Param(
        os.environ.get("MAGA_PLANNING_MODE", "flat"),
        type="string",
        enum=["flat", "dated"],
        description="flat: next shards_per_run shards of a flat corpus; dated: the {ds} partition",
    ),
    "shards_per_run": Param(8, type="integer", minimum=1, description="Shard budget of one run"),
    "max_docs_per_shard": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        description="Trial run: the first N documents of each shard, under {output_root}/_trials/first-N/, not registered",
    ),
    "judge_sample_per_shard": Param(
        0,
        type="integer",
        minimum=0,
        description="Rewrites of each newly registered shard scored by the LLM judge (0: no judge)",
    ),
    "endpoints": Param(
        _default_endpoints(),
        type="array",
        items={"type": "string", "pattern": "^https?://"},
        minItems=1,
        description="vLLM base URLs (default from MAGA_ENDPOINTS, comma-separated)",
    ),
    "served_model": Param(
        os.environ.get("MAGA_SERVED_MODEL") or None,
        type=["null", "string"],
        description="Model name the vLLM workers serve, when not the recipe's model (default MAGA_SERVED_MODEL)",
    ),
    "max_concurrency": Param(128, type="integer", minimum=1, maximum=4096, description="Requests in flight per shard task"),
    "progress_interval_s": Param(30, type="number", exclusiveMinimum=0, description="Seconds between progress log lines"),
}


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
    from maga_tasks.settings import RunSettings

    return RunSettings(
        endpoints=tuple(params["endpoints"]),
        api_key=_api_key(),
        served_model=params["served_model"],
        max_concurrency=params["max_concurrency"],
        progress_interval_s=params["progress_interval_s"],
        **overrides,
    )


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
        from maga_tasks.recipe import load_recipe

        recipe = load_recipe(params["recipe"])

        async def healthy() -> list[str]:
            async with LLMClient(_run_settings(params), model=recipe.model) as client:
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
    def plan_shards(params: dict, ds: str) -> list[dict]:
        """The shards this run publishes: unregistered ones within the budget."""
        from maga_tasks.engine.planning import plan_shards as plan
        from maga_tasks.recipe import load_recipe
        from maga_tasks.registry import Registry

        recipe = load_recipe(params["recipe"])
        registry = Registry(_registry_url(params["output_root"]))
        registry.upgrade()
        registry.ensure_recipe(recipe)
        shards = plan(
            params["source"],
            recipe.recipe_id,
            registry,
            mode=params["planning_mode"],
            ds=ds,
            budget=params["shards_per_run"],
            s3_endpoint_url=_s3_endpoint_url(),
        )
        log.info("recipe %s: %d shard(s) to publish: %s", recipe.recipe_id, len(shards), [s["shard"] for s in shards])
        return [{**s, "recipe_id": recipe.recipe_id} for s in shards]

    @task(
        pool=POOL,
        map_index_template="{{ task.op_kwargs['shard']['shard'] }}",
        execution_timeout=SHARD_TIMEOUT,
    )
    def publish_shard(shard: dict, params: dict) -> dict:
        """Expand -> validate -> register one shard; returns its summary (no text)."""
        from maga_tasks.engine.publish import publish_shard as publish
        from maga_tasks.recipe import load_recipe
        from maga_tasks.registry import Registry

        _show_library_logs()
        recipe = load_recipe(params["recipe"])
        if recipe.recipe_id != shard["recipe_id"]:
            raise ValueError(
                f"recipe changed since planning ({shard['recipe_id']} -> {recipe.recipe_id}); rerun the DAG"
            )
        context = get_current_context()
        ti = context["ti"]
        # Stable across tries, so a retry takes over the lease of the attempt it replaces.
        owner = f"airflow:{ti.dag_id}/{ti.task_id}/{ti.map_index}/{ti.run_id}"
        return publish(
            shard["source_uri"],
            params["output_root"],
            recipe,
            _run_settings(params, s3_endpoint_url=_s3_endpoint_url()),
            Registry(_registry_url(params["output_root"])),
            owner=owner,
            shard=shard["shard"],
            max_docs=params["max_docs_per_shard"],
            judge_sample=params["judge_sample_per_shard"],
        )

    @task(trigger_rule="none_failed", outlets=[CORPUS_ALIAS])
    def summarize(results, params: dict):
        """Log this run's figures and the corpus totals; emit the corpus asset event."""
        from maga_tasks.engine.publish import run_report
        from maga_tasks.recipe import load_recipe
        from maga_tasks.registry import Registry

        recipe = load_recipe(params["recipe"])
        registry = Registry(_registry_url(params["output_root"]))
        extra = run_report([results[i] for i in range(len(results))], registry, recipe.recipe_id)
        if params["max_docs_per_shard"]:  # a trial run leaves the corpus unchanged: no asset event
            return extra
        yield Metadata(Asset(f"maga://corpus/{recipe.recipe_id}", group="maga"), extra=extra, alias=CORPUS_ALIAS)
        return extra

    ready = wait_for_llm_workers()
    planned = plan_shards()
    ready >> planned
    summarize(publish_shard.expand(shard=planned))


maga_corpus_expansion()
