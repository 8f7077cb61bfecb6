"""What the corpus dashboard shows, computed from the registry (no web framework here).

`corpus_overview` answers the dashboard's JSON API: per recipe the totals (shards by
status, documents, tokens in and out, expansion ratio, the fidelity rates, rejection
reasons, the genre/audience distribution) and a page of shards with their quality gate results and
the Airflow task that last worked on each. It reads through the `Registry` API only.

What it serves passes `served`: every text redacted and without control characters
(rows written before errors were cleaned on the way in are cleaned on the way out), and a
report link only when it is a Data Docs or result file of its own shard in the corpus
(`report_link`). The page escapes every value it shows; this is the server's half.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlsplit

from maga_tasks.redaction import clean_text
from maga_tasks.registry import Registry

# The DAG leases shards as "airflow:{dag_id}/{task_id}/{map_index}/{run_id}/try-{try_number}"
# (older registries hold owners without the try).
_AIRFLOW_OWNER = re.compile(
    r"^airflow:(?P<dag_id>[^/]+)/(?P<task_id>[^/]+)/(?P<map_index>-?\d+)/(?P<run_id>.+?)(?:/try-(?P<try_number>\d+))?$"
)

_SHARD_FIELDS = (
    "shard",
    "status",
    "source_uri",
    "data_uri",
    "documents",
    "accepted",
    "rejected",
    "prompt_tokens",
    "completion_tokens",
    "expansion_ratio",
    # Shares in 0..1, None when not measured (`data.figures`): computed by the registry's
    # reads from the shard's fidelity counts.
    "invented_fact_rate",
    "label_echo_rate",
    "genre_kept_rate",
    "rejects_by_reason",
    "failed_expectations",
    "attempts",
    "seconds",
    "last_error",
    "registered_at",
    "updated_at",
)


def airflow_task_of(owner: str | None) -> dict | None:
    """The Airflow task behind a lease owner, with its path in the Airflow 3 UI."""
    match = _AIRFLOW_OWNER.match(owner or "")
    if not match:
        return None
    task = match.groupdict()
    task["map_index"] = int(task["map_index"])
    task["try_number"] = int(task["try_number"]) if task["try_number"] else None
    path = (
        f"dags/{quote(task['dag_id'], safe='')}/runs/{quote(task['run_id'], safe='')}"
        f"/tasks/{quote(task['task_id'], safe='')}"
    )
    if task["map_index"] >= 0:
        path += f"/mapped/{task['map_index']}"
    task["ui_path"] = path
    return task


# What a gate writes under its shard's quality folder (`quality.datadocs`): the compact
# result `{gate}.json` and the Data Docs index `{gate}/index.html`.
_REPORT_FILE = re.compile(r"^[a-z]+(?P<kind>\.json|/index\.html)$")
# The pipeline writes reports to local paths and S3; http(s) links only under a corpus
# root the deployment names (`MAGA_OUTPUT_ROOT`), so no link leads to a foreign host.
_CORPUS_SCHEMES = ("s3", "file")
_LINK_SCHEMES = ("http", "https", "s3", "file")
# Longest text served in one field; stored errors are already cut shorter.
MAX_SERVED_TEXT = 4000


def served(value: Any) -> Any:
    """`value` fit to serve: every text in it redacted and without control characters."""
    if isinstance(value, str):
        return clean_text(value, MAX_SERVED_TEXT)
    if isinstance(value, dict):
        return {served(key): served(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [served(item) for item in value]
    return value


def report_link(
    uri: str | None, recipe_id: str, shard: str, corpus_root: str | None = None, serve_prefix: str | None = None
) -> dict | None:
    """A quality result's link for the page: its kind ("data_docs" for a Data Docs
    site, "json" for a compact result) and an href a browser can follow: for a local
    file, `{serve_prefix}/{recipe_id}/{shard}/{report}` when the dashboard serves reports
    (`reports.report_file`; a browser refuses `file://` links from an http page; a Data
    Docs site at its folder, `{gate}/`, where the dashboard lists its pages), else a
    `file://` URL; an `s3://` URI stays as it is, for the S3 console or CLI.

    None unless `uri` is a gate's report in this shard's quality folder
    (`{root}/{recipe_id}/quality/{shard}/...`), a local path or an s3/file URL, or any
    http(s)/s3/file URL under `corpus_root` when the deployment names one: a
    `javascript:` link, a foreign host's or another shard's file is not served."""
    if not uri:
        return None
    root, folder, report = uri.rpartition(f"/{recipe_id}/quality/{shard}/")
    href = uri if "://" in uri else "file://" + quote(uri)
    scheme = urlsplit(href).scheme
    match = _REPORT_FILE.match(report)
    if not folder or match is None or "/../" in f"{root}/":
        return None
    if corpus_root is None and scheme not in _CORPUS_SCHEMES:
        return None
    if corpus_root is not None and (scheme not in _LINK_SCHEMES or root.rstrip("/") != corpus_root.rstrip("/")):
        return None
    kind = "data_docs" if match["kind"].endswith(".html") else "json"
    if serve_prefix is not None and scheme == "file":
        # A Data Docs site opens at its contents (`reports.data_docs_pages`), the folder.
        served = report.removesuffix("index.html") if kind == "data_docs" else report
        href = f"{serve_prefix}/{quote(recipe_id, safe='')}/{quote(shard, safe='')}/{quote(served)}"
    return {"kind": kind, "label": {"data_docs": "Data Docs", "json": "result JSON"}[kind], "href": href}


def _last_owner(events: list[dict]) -> str | None:
    return events[-1]["owner"] if events else None


def _quality_summary(results: list[dict], corpus_root: str | None, serve_prefix: str | None) -> dict | None:
    """The latest result of each suite (input, output) of a shard."""
    latest: dict[str, dict] = {}
    for result in results:  # oldest first
        latest[result["suite"]] = result
    if not latest:
        return None
    return {
        suite: {
            "success": bool(result["success"]),
            "evaluated": result.get("evaluated"),
            "failed": result.get("failed"),
            "failed_expectations": result.get("failed_expectations") or [],
            "docs_uri": result.get("docs_uri"),
            # What to open: the Data Docs site when the gate wrote one, else its JSON.
            "report": report_link(
                result.get("docs_uri"), result["recipe_id"], result["shard"], corpus_root, serve_prefix
            ),
            "created_at": result.get("created_at"),
            # The judge's headline figure: share of sampled rewrites scoring >= 3; and,
            # where its recipe asks, the share it says keep their genre.
            "pass_share": (result.get("statistics") or {}).get("pass_share") if suite == "judge" else None,
            "genre_kept_share": (result.get("statistics") or {}).get("genre_kept_share") if suite == "judge" else None,
        }
        for suite, result in sorted(latest.items())
    }


# The page's default: the 50 most recently updated shards of a recipe, plus up to as many
# of its quarantined and failed ones (they wait for a person, however old). Ask for more
# with `shard_limit` (the API's `?shard_limit=`); `shards_not_shown` says how many are left.
DEFAULT_SHARD_LIMIT = 50


def shard_rows(
    registry: Registry, recipe_id: str, *, limit: int = DEFAULT_SHARD_LIMIT, corpus_root: str | None = None,
    serve_prefix: str | None = None,
) -> list[dict]:
    """The `limit` most recently updated shards of a recipe and up to `limit` quarantined
    or failed ones, newest first, with quality and task (four queries, however many
    shards: each a LIMIT read by index)."""
    newest = registry.shards(recipe_id, newest_first=True, limit=limit)
    shown = {shard["shard"] for shard in newest}
    waiting = [s for s in registry.attention_shards(recipe_id, limit=limit) if s["shard"] not in shown]
    shards = sorted(newest + waiting, key=lambda s: (s["updated_at"] or ""), reverse=True) if waiting else newest
    names = [shard["shard"] for shard in shards]
    quality = registry.quality_results_of(recipe_id, names)
    owners = registry.owner_events_of(recipe_id, names)
    rows = []
    for shard in shards:
        row = {name: shard.get(name) for name in _SHARD_FIELDS}
        row["quality"] = _quality_summary(quality[shard["shard"]], corpus_root, serve_prefix)
        row["airflow_task"] = airflow_task_of(shard.get("lease_owner") or _last_owner(owners[shard["shard"]]))
        rows.append(row)
    return rows


def corpus_overview(
    registry: Registry, *, recipe_id: str | None = None, shard_limit: int = DEFAULT_SHARD_LIMIT,
    corpus_root: str | None = None, serve_prefix: str | None = None,
) -> dict:
    """Everything the dashboard page shows, for one recipe or for all of them: totals over
    every shard (summed by the database), a bounded page of shards per recipe; `served`,
    with report links only into `corpus_root` when given, local ones through
    `serve_prefix` when the caller serves them (`report_link`)."""
    recipes = registry.recipes()
    known = {recipe["recipe_id"] for recipe in recipes}
    # Shards may be planned before their recipe row exists; show those versions too.
    recipes += [{"recipe_id": rid, "name": None} for rid in registry.recipe_ids() if rid not in known]
    selected = [r for r in recipes if recipe_id is None or r["recipe_id"] == recipe_id]
    versions = []
    for recipe in selected:
        rid = recipe["recipe_id"]
        totals = registry.totals(rid)
        shards = shard_rows(registry, rid, limit=shard_limit, corpus_root=corpus_root, serve_prefix=serve_prefix)
        versions.append(
            {
                "recipe": {
                    k: recipe.get(k)
                    for k in ("recipe_id", "name", "prompt_version", "model", "pairs_per_document", "created_at")
                },
                "totals": totals,
                "shards": shards,
                "shards_not_shown": max(0, totals["shards"] - len(shards)),
            }
        )
    if len(versions) == 1 and (recipe_id is not None or len(recipes) == 1):
        # One version is the whole scope: its totals are the page's, not summed again.
        overall = {**versions[0]["totals"], "recipe_id": recipe_id}
    else:
        overall = registry.totals(recipe_id)
    return served({"totals": overall, "recipes": versions})
