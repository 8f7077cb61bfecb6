"""Airflow plugin: the "MAGA corpus" dashboard, served by the api-server.

- A FastAPI app mounted at `/maga`: the page (`/maga/`) and its JSON API
  (`/maga/api/overview`, `/maga/api/totals`), both behind Airflow's authentication
  (the UI's `_token` cookie or an `Authorization: Bearer` JWT from `/auth/token`) and
  authorized like reading the DAG's runs.
- An external view adding "MAGA corpus" to the Airflow UI's navigation, which shows the
  page inside the UI.

The registry database is found like the DAG finds it: `MAGA_REGISTRY_URL`, else the
Airflow connection `maga_registry`, else `{MAGA_OUTPUT_ROOT}/_registry.sqlite`.

Every answer is redacted and free of control characters (`dashboard.served`); report
links are served only into their shard's quality folder, as local/S3 files, or under
`MAGA_DASHBOARD_REPORT_ROOT` when the deployment sets it (then http(s) too).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import ClassVar

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

DAG_ID = "maga_corpus_expansion"
REGISTRY_CONN_ID = "maga_registry"
URL_PREFIX = "/maga"
PAGE = Path(__file__).with_name("maga_corpus_dashboard.html")

# Who may read the corpus dashboard: whoever may read the DAG's runs.
can_read_corpus = requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID)


def registry_url() -> str:
    configured = os.environ.get("MAGA_REGISTRY_URL")
    if configured:
        return configured
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        conn = Connection.get_connection_from_secrets(REGISTRY_CONN_ID)
    except AirflowNotFoundException:
        output_root = os.environ.get("MAGA_OUTPUT_ROOT")
        if not output_root or output_root.startswith("s3://"):
            raise HTTPException(
                503, f"no registry configured: set the connection {REGISTRY_CONN_ID!r} or MAGA_REGISTRY_URL"
            ) from None
        return os.path.join(output_root, "_registry.sqlite")
    from maga_tasks.registry import url_from_connection

    return url_from_connection(
        conn.conn_type, host=conn.host, login=conn.login, password=conn.password, port=conn.port, schema=conn.schema
    )


@functools.lru_cache(maxsize=4)
def _registry(url: str):
    from maga_tasks.registry import Registry

    return Registry(url)


def open_registry():
    return _registry(registry_url())


dashboard_app = FastAPI(
    title="MAGA corpus dashboard",
    description="Corpus versions, shards and quality results from the MAGA registry.",
    dependencies=[Depends(can_read_corpus)],
    # FastAPI's own docs routes skip the app's dependencies, so they would answer without
    # a login; the JSON API is described in README instead.
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@dashboard_app.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> str:
    return PAGE.read_text(encoding="utf-8")


@dashboard_app.get("/api/totals")
def corpus_totals(recipe_id: str | None = Query(None, description="one corpus version; all when omitted")) -> dict:
    """The registry's totals (shards by status, documents, tokens, expansion ratio)."""
    from maga_tasks.registry.dashboard import served

    return served(open_registry().totals(recipe_id))


@dashboard_app.get("/api/overview")
def corpus_overview(
    recipe_id: str | None = Query(None, description="one corpus version; all when omitted"),
    shard_limit: int = Query(
        50, ge=1, le=2000, description="shards listed per recipe, newest first, plus as many quarantined or failed ones"
    ),
) -> dict:
    """Totals per recipe, rejection reasons, genre/audience distribution, shard table."""
    from maga_tasks.registry.dashboard import corpus_overview as overview

    return overview(
        open_registry(), recipe_id=recipe_id, shard_limit=shard_limit,
        corpus_root=os.environ.get("MAGA_DASHBOARD_REPORT_ROOT") or None,
    )


class MagaCorpusPlugin(AirflowPlugin):
    name = "maga_corpus"
    fastapi_apps: ClassVar[list[dict]] = [
        {"app": dashboard_app, "url_prefix": URL_PREFIX, "name": "MAGA corpus dashboard"}
    ]
    external_views: ClassVar[list[dict]] = [
        {
            "name": "MAGA corpus",
            "href": "maga/",
            "url_route": "maga-corpus",
            "destination": "nav",
            "category": "browse",
        }
    ]
