"""Running great_expectations for the gates: an ephemeral GX context, the suites
validated over in-memory frames, their failures in a readable form, and the Data Docs
site. Data Docs are rendered into a temporary folder and then copied under
`{output_root}/{recipe_id}/quality/{shard}/{gate}/` (also on S3).

great_expectations is imported only when a gate runs (`import_gx`): an Airflow DAG file
that imports the quality package still parses in milliseconds.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maga_tasks.data.layout import ShardPaths
from maga_tasks.data.storage import join, storage_for

if TYPE_CHECKING:
    import pandas as pd

DOCS_SITE = "maga_quality"
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


def _run_suites(gate: str, shard: str, suites: list[tuple[str, pd.DataFrame, list]], site_dir: Path) -> tuple[dict, list[dict]]:
    """Validate each (name, frame, expectations) and render Data Docs into `site_dir`."""
    gx, _ = import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    context = _ephemeral_context(gx, site_dir)
    source = context.data_sources.add_pandas(name=f"{gate}_frames")
    run_id = RunIdentifier(run_name=shard, run_time=datetime.now(UTC))
    counts: Counter = Counter()
    failed: list[dict] = []
    for name, frame, expectations in suites:
        suite_name = f"{gate}.{name}"
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{suite_name}.checkpoint",
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
                result_format="SUMMARY",
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=run_id)
        for run_result in outcome.run_results.values():
            counts.update({k: v for k, v in run_result.statistics.items() if k != "success_percent"})
            failed.extend(_failure(suite_name, r) for r in run_result.results if not r.success)
    evaluated = counts.get("evaluated_expectations", 0)
    statistics = {
        "evaluated_expectations": evaluated,
        "successful_expectations": counts.get("successful_expectations", 0),
        "unsuccessful_expectations": counts.get("unsuccessful_expectations", 0),
        "success_percent": round(100.0 * counts.get("successful_expectations", 0) / evaluated, 2) if evaluated else None,
        "suites": [f"{gate}.{name}" for name, _, _ in suites],
    }
    return statistics, failed


def _publish_docs(site_dir: Path, target: str, s3_endpoint_url: str | None) -> str:
    """Replace the Data Docs under `target` with the freshly rendered site."""
    storage = storage_for(target, s3_endpoint_url)
    storage.delete_prefix(target)
    for path in sorted(site_dir.rglob("*")):
        if path.is_file() and path.suffix in _DOCS_SUFFIXES:
            storage.put_file(join(target, path.relative_to(site_dir).as_posix()), path)
    return join(target, "index.html")


def run_gate(gate: str, paths: ShardPaths, suites: list, s3_endpoint_url: str | None) -> tuple[dict, list, str]:
    """Run the (name, frame, expectations) suites of `gate` on a shard and publish their
    Data Docs under the shard's quality folder: (statistics, failures, docs index URI)."""
    with tempfile.TemporaryDirectory(prefix=f"maga-gx-{gate}-") as tmp:
        site_dir = Path(tmp) / "site"
        statistics, failed = _run_suites(gate, paths.shard, suites, site_dir)
        docs_uri = _publish_docs(site_dir, join(paths.quality_docs, gate), s3_endpoint_url)
    return statistics, failed, docs_uri


__all__ = ["DOCS_SITE", "import_gx", "run_gate"]
