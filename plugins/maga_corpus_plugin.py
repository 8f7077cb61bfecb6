"""Airflow plugin: the "MAGA corpus" dashboard, served by the api-server.

- A FastAPI app mounted at `/maga`: the page (`/maga/`), its JSON API
  (`/maga/api/overview`, `/maga/api/totals`) and the shards' quality reports
  (`/maga/reports/{recipe_id}/{shard}/{file}`: result JSON and Data Docs), all behind
  Airflow's authentication (the UI's `_token` cookie or an `Authorization: Bearer` JWT
  from `/auth/token`) and authorized like reading the DAG's runs.
- An external view adding "MAGA corpus" to the Airflow UI's navigation, which shows the
  page inside the UI.

The registry database is found like the DAG finds it: `MAGA_REGISTRY_URL`, else the
Airflow connection `maga_registry`, else `{MAGA_OUTPUT_ROOT}/_registry.sqlite`.

Every answer is redacted and free of control characters (`dashboard.served`); report
links are served only into their shard's quality folder, as local/S3 files, or under
`MAGA_DASHBOARD_REPORT_ROOT` when the deployment sets it (then http(s) too). Local report
files are served by this app (`registry.reports.report_file`: that folder only) with
their own content type, `nosniff` and a CSP sandbox: Data Docs pages hold values from
the data, so no script of theirs runs and they load nothing from elsewhere.
"""

from __future__ import annotations

import functools
import html
import os
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, Response

DAG_ID = "maga_corpus_expansion"
REGISTRY_CONN_ID = "maga_registry"
URL_PREFIX = "/maga"
# Report links on the page, relative to the Airflow UI's base (where the page resolves them).
REPORTS_HREF = URL_PREFIX.lstrip("/") + "/reports"
# Served reports: no sniffing, no script, nothing from another origin, no framing elsewhere.
# `allow-same-origin` without `allow-scripts` lets a page load its own styles with the
# login cookie while nothing in it can run.
REPORT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "sandbox allow-same-origin allow-popups allow-popups-to-escape-sandbox; default-src 'none'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; script-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
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

    # create=False: a mistyped path is reported, not made into an empty registry.
    return Registry(url, create=False)


def open_registry():
    from maga_tasks.registry.errors import RegistryNotFound

    try:
        return _registry(registry_url())
    except RegistryNotFound as error:
        raise HTTPException(
            503, f"{error}; set MAGA_REGISTRY_URL or the connection {REGISTRY_CONN_ID!r} to the registry the DAG writes"
        ) from None


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
        corpus_root=os.environ.get("MAGA_DASHBOARD_REPORT_ROOT") or None, serve_prefix=REPORTS_HREF,
    )


@dashboard_app.get("/reports/{recipe_id}/{shard}/{relative:path}", include_in_schema=False)
def shard_report(recipe_id: str, shard: str, relative: str) -> Response:
    """A file of the shard's quality folder (a gate's result JSON, a Data Docs page or
    its styles), or, for `{gate}/`, the contents of that gate's Data Docs site; 404 for
    anything else."""
    from maga_tasks.registry.reports import ReportNotServed, data_docs_pages, report_file

    try:
        if relative.endswith("/"):
            gate = relative[:-1]
            page = data_docs_contents(shard, gate, data_docs_pages(open_registry(), recipe_id, shard, gate))
            return HTMLResponse(page, headers=REPORT_HEADERS)
        path, media_type = report_file(open_registry(), recipe_id, shard, relative)
    except ReportNotServed:
        raise HTTPException(404, "no such report of this shard") from None
    return FileResponse(path, media_type=media_type, headers=REPORT_HEADERS)


def data_docs_contents(shard: str, gate: str, pages: list[str]) -> str:
    """The contents of a Data Docs site: its plain-HTML pages, linked relatively (names
    come from files: escaped)."""
    items = "".join(
        f'<li><a class="page" href="{html.escape(quote(page))}">{html.escape(page)}</a></li>' for page in pages
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Data Docs: {html.escape(shard)} {html.escape(gate)}</title></head>"
        f"<body><h1>Data Docs of {html.escape(shard)}, {html.escape(gate)} gate</h1>"
        f"<p>Validation results and expectation suites ({len(pages)} pages).</p><ul>{items}</ul>"
        '<p><a href="index.html">The Great Expectations index</a> (its table needs scripts from '
        "the internet, which this server does not let run).</p></body></html>"
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
