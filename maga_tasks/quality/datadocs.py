"""Running great_expectations for the gates: an ephemeral GX context, the suites
validated over in-memory frames, their results in a compact, readable form, and Data
Docs by exception. Every shard gets `quality/{shard}/{gate}.json` (each expectation:
type, column, success, observed value, unexpected count); the full Data Docs site is
rendered (into a temporary folder, then copied under `quality/{shard}/{gate}/`, also
on S3) only for a shard that fails the gate and for a deterministic sample of passing
ones (`data_docs_sample_rate`), so a corpus version is not 16 files per shard.

great_expectations is imported only when a gate runs (`import_gx`): an Airflow DAG file
that imports the quality package still parses in milliseconds.

Values from the data are untrusted: GX renders parts of a result (the table of
unexpected values) as raw HTML, so a source id such as `<img src=x onerror=...>` would be
live markup in Data Docs. Before a site is rendered, every text in the stored results is
made inert (`_inert`: markup characters shown as look-alikes); the JSON result keeps the
values as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maga_tasks.data.layout import ShardPaths
from maga_tasks.data.storage import join, storage_for
from maga_tasks.settings import setting_default

if TYPE_CHECKING:
    import pandas as pd

DOCS_SITE = "maga_quality"
# Share of passing shards that still get a full Data Docs site (failed ones always do).
DATA_DOCS_SAMPLE_RATE = setting_default("data_docs_sample_rate")
_FAILURE_KEYS = ("suite", "check", "expectation", "column", "observed", "expected")
# Data Docs pages load bootstrap etc. from CDNs; of GX's static folder they only use
# the styles and the favicon, so the 4 MB of fonts and images are not copied.
_DOCS_SUFFIXES = (".html", ".css", ".ico")


def import_gx():
    """great_expectations and its expectations module, quiet and without analytics."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx, gxe


def _ephemeral_context(gx, site_dir: Path):
    """An in-memory GX context whose only Data Docs site is `site_dir`."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


# The characters that make markup or close an attribute, and the full-width look-alikes
# Data Docs show in their place: readable, and never parsed as HTML whether or not GX
# escapes the field it renders.
_INERT = str.maketrans({"<": "\uff1c", ">": "\uff1e", "&": "\uff06", '"': "\uff02", "'": "\uff07", "`": "\uff40"})


def _inert(value: Any) -> Any:
    """`value` (a GX result, nested) with every text's markup characters made inert."""
    if isinstance(value, str):
        return value.translate(_INERT)
    if isinstance(value, dict):
        return {_inert(key): _inert(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_inert(item) for item in value]
    return value


def _make_results_inert(context) -> None:
    """Rewrite the validation results the context holds, from which Data Docs are built,
    with their data values inert (`_inert`)."""
    store = context.validation_results_store
    for key in store.list_keys():
        suite_result = store.get(key)
        for result in suite_result.results:
            result.result = _inert(result.result or {})
            result.exception_info = _inert(result.exception_info or {})
        store.set(key, suite_result)


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy numbers to Python ones)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return str(value)
    return value


def _short(value: Any, limit: int = 60) -> str:
    value = _plain(value)
    if isinstance(value, float) and math.isnan(value):  # NaN: how pandas shows a missing value
        value = None
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exception_message(info: dict | None) -> str | None:
    if not info:
        return None
    if info.get("raised_exception"):
        return info.get("exception_message") or "raised an exception"
    for nested in info.values():
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return nested.get("exception_message") or "raised an exception"
    return None


def _observed(validation) -> str:
    error = _exception_message(validation.exception_info)
    if error:
        return f"error: {error}"
    result = validation.result or {}
    if "unexpected_count" in result:
        count, total = result.get("unexpected_count") or 0, result.get("element_count") or 0
        share = f" ({100.0 * count / total:.1f}%)" if total else ""
        examples = [_short(item["value"]) for item in (result.get("partial_unexpected_counts") or [])[:3]]
        text = f"{count} of {total} rows unexpected{share}"
        return text + (f", e.g. {', '.join(examples)}" if examples else "")
    if "observed_value" in result:
        observed = _plain(result["observed_value"])
        if isinstance(observed, float):
            observed = round(observed, 4)
        return f"observed {observed}"
    return "failed"


_THRESHOLD_KEYS = ("min_value", "max_value", "mostly", "value_set", "value", "column_set")


def _failure(suite: str, validation) -> dict:
    config = validation.expectation_config
    kwargs = config.kwargs or {}
    column = kwargs.get("column") or (",".join(kwargs["column_list"]) if kwargs.get("column_list") else None)
    return {
        "suite": suite,
        "check": (config.meta or {}).get("check") or config.type,
        "expectation": config.type,
        "column": column,
        "observed": _observed(validation),
        "expected": {k: _plain(kwargs[k]) for k in _THRESHOLD_KEYS if kwargs.get(k) is not None},
    }


def _json_safe(value: Any) -> Any:
    """A GX result value as plain JSON (numpy scalars, NaN and odd types made plain)."""
    value = _plain(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _entry(suite: str, validation) -> dict:
    """One expectation's outcome in the compact result: what it checked, whether it
    held, the observed value or the unexpected count."""
    result = validation.result or {}
    entry = _failure(suite, validation) | {"success": bool(validation.success)}
    for key in ("observed_value", "unexpected_count", "element_count", "unexpected_percent"):
        if key in result:
            entry[key] = _json_safe(result[key])
    return entry


def data_docs_sampled(shard: str, rate: float) -> bool:
    """Whether a passing shard gets its full Data Docs: a deterministic sample of
    `rate`, chosen by a hash of the shard name, so a retry makes the same choice."""
    if rate <= 0:
        return False
    draw = int.from_bytes(hashlib.sha256(f"data-docs/{shard}".encode()).digest()[:8], "big") / 2**64
    return draw < rate


@dataclass
class GateRun:
    """What one gate found on one shard and where its results went."""

    statistics: dict
    failed: list[dict]  # the failed expectations, as in the registry
    expectations: list[dict]  # every expectation's outcome (`_entry`)
    result_uri: str  # the compact JSON result, written for every shard
    data_docs_uri: str | None  # the Data Docs index, for failed and sampled shards only

    @property
    def docs_uri(self) -> str:
        """What a reader should open: the Data Docs site when there is one, else the JSON."""
        return self.data_docs_uri or self.result_uri


def _run_suites(
    gate: str, shard: str, suites: list[tuple[str, pd.DataFrame, list]], context
) -> tuple[dict, list[dict]]:
    """Validate each (name, frame, expectations); the results stay in the context's
    stores, from which Data Docs can be built afterwards."""
    gx, _ = import_gx()
    from great_expectations.core.run_identifier import RunIdentifier

    source = context.data_sources.add_pandas(name=f"{gate}_frames")
    run_id = RunIdentifier(run_name=_inert(shard), run_time=datetime.now(UTC))
    counts: Counter = Counter()
    entries: list[dict] = []
    for name, frame, expectations in suites:
        suite_name = f"{gate}.{name}"
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY", run_id=run_id)
        counts.update({k: v for k, v in outcome.statistics.items() if k != "success_percent"})
        entries.extend(_entry(suite_name, r) for r in outcome.results)
    evaluated = counts.get("evaluated_expectations", 0)
    successful = counts.get("successful_expectations", 0)
    statistics = {
        "evaluated_expectations": evaluated,
        "successful_expectations": successful,
        "unsuccessful_expectations": counts.get("unsuccessful_expectations", 0),
        "success_percent": round(100.0 * successful / evaluated, 2) if evaluated else None,
        "suites": [f"{gate}.{name}" for name, _, _ in suites],
    }
    return statistics, entries


def _publish_docs(site_dir: Path, target: str, storage) -> str:
    """Replace the Data Docs under `target` with the freshly rendered site."""
    storage.delete_prefix(target)
    for path in sorted(site_dir.rglob("*")):
        if path.is_file() and path.suffix in _DOCS_SUFFIXES:
            storage.put_file(join(target, path.relative_to(site_dir).as_posix()), path)
    return join(target, "index.html")


def result_uri(paths: ShardPaths, gate: str) -> str:
    """Where a gate's compact JSON result of a shard goes: `quality/{shard}/{gate}.json`."""
    return join(paths.quality_docs, f"{gate}.json")


def run_gate(
    gate: str,
    paths: ShardPaths,
    suites: list,
    s3_endpoint_url: str | None,
    *,
    data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE,
    facts: dict | None = None,
) -> GateRun:
    """Run the (name, frame, expectations) suites of `gate` on a shard. Every shard gets
    a compact JSON result under its quality folder (with `facts`, e.g. figures, in its
    statistics); the full Data Docs site is rendered only when the gate fails or the
    shard is in the `data_docs_sample_rate` sample, else an earlier site is removed so
    that what exists is this run's."""
    gx, _ = import_gx()
    storage = storage_for(paths.quality_docs, s3_endpoint_url)
    docs_target = join(paths.quality_docs, gate)
    with tempfile.TemporaryDirectory(prefix=f"maga-gx-{gate}-") as tmp:
        site_dir = Path(tmp) / "site"
        context = _ephemeral_context(gx, site_dir)
        statistics, entries = _run_suites(gate, paths.shard, suites, context)
        statistics |= facts or {}
        failed = [{k: e[k] for k in _FAILURE_KEYS} for e in entries if not e["success"]]
        data_docs_uri = None
        if failed or data_docs_sampled(paths.shard, data_docs_sample_rate):
            _make_results_inert(context)
            context.build_data_docs(site_names=[DOCS_SITE])
            data_docs_uri = _publish_docs(site_dir, docs_target, storage)
        else:
            storage.delete_prefix(docs_target)
    run = GateRun(statistics, failed, entries, result_uri(paths, gate), data_docs_uri)
    body = {
        "gate": gate,
        "shard": paths.shard,
        "recipe_id": paths.recipe_id,
        "success": not failed,
        "data_docs_uri": data_docs_uri,
        "statistics": _json_safe(statistics),
        "expectations": entries,
    }
    storage.put_bytes(run.result_uri, json.dumps(body, indent=1, ensure_ascii=False).encode("utf-8"))
    return run


__all__ = ["DATA_DOCS_SAMPLE_RATE", "DOCS_SITE", "GateRun", "data_docs_sampled", "import_gx", "result_uri", "run_gate"]
