"""The OpenLineage parts of a shard task's events: datasets named after the storage,
and the facets of ours (`magaRecipe`, `magaShard`), whose JSON schemas ship beside this
module in `lineage_facets.schema.json`.

- Inputs: the source shard. Outputs (COMPLETE, once the shard's files exist): its
  `data/`, `rejected/` and `magacorpus/` files, `data/` and `rejected/` with the
  standard `outputStatistics` facet (rows written).
- Dataset names follow OpenLineage's naming: namespace `file` and the absolute path for
  local files, namespace `s3://{bucket}` and the key for S3.
- Run facets: `magaRecipe` (recipe id, model, model revision, prompt version) and
  `magaShard` (documents, accepted and rejected rows, rejected rows by reason, tokens,
  yield, expansion, the quality gate's result, checksum). The provider adds its own run
  facets (`parent`: the DAG run; `airflow`: DAG, run and task instance).

Imported only by the provider's calls (`maga_tasks.lineage`): it needs the OpenLineage
client.
"""

from __future__ import annotations

import os
from typing import ClassVar
from urllib.parse import urlparse

import attr
from openlineage.client.event_v2 import InputDataset, OutputDataset
from openlineage.client.facet_v2 import RunFacet, output_statistics_output_dataset

from maga_tasks import __version__ as _version
from maga_tasks.data.layout import shard_paths
from maga_tasks.recipe import Recipe

# Who made the facets, and where their schemas are: the schema file ships in the wheel
# (maga_tasks/lineage_facets.schema.json); the URN names that file, the fragment the facet.
PRODUCER = f"urn:maga-tasks:{_version}"
SCHEMA_URL = "urn:maga-tasks:lineage-facets:1-0-0"

# The shard figures a registry row holds, with their facet names.
_ROW_FIGURES = {
    "documents": "documents",
    "accepted": "accepted",
    "rejected": "rejected",
    "rejects_by_reason": "rejectedByReason",
    "prompt_tokens": "promptTokens",
    "completion_tokens": "completionTokens",
    "expansion_ratio": "expansionRatio",
}


@attr.define
class MagaRecipeRunFacet(RunFacet):
    """What made the rows: the recipe and the model behind it."""

    recipeId: str = attr.field()  # noqa: N815 - OpenLineage facets are camelCase JSON
    model: str = attr.field()
    modelRevision: str | None = attr.field(default=None)  # noqa: N815
    promptVersion: str = attr.field(default="")  # noqa: N815

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._producer = PRODUCER  # ours, not the client's default

    @staticmethod
    def _get_schema() -> str:
        return f"{SCHEMA_URL}#/$defs/MagaRecipeRunFacet"


@attr.define
class MagaShardRunFacet(RunFacet):
    """What the shard amounts to once the task decided it (the registry's figures)."""

    shard: str = attr.field()
    status: str = attr.field()  # registered | quarantined | trial
    documents: int = attr.field(default=0)
    accepted: int = attr.field(default=0)
    rejected: int = attr.field(default=0)
    rejectedByReason: dict[str, int] = attr.field(factory=dict)  # noqa: N815
    promptTokens: int = attr.field(default=0)  # noqa: N815
    completionTokens: int = attr.field(default=0)  # noqa: N815
    # Accepted rows among the rows written (accepted + rejected): the quality report's yield.
    yieldShare: float = attr.field(default=0.0)  # noqa: N815
    expansionRatio: float = attr.field(default=0.0)  # noqa: N815
    qualityGatePassed: bool = attr.field(default=False)  # noqa: N815
    failedExpectations: list[str] = attr.field(factory=list)  # noqa: N815
    checksum: str | None = attr.field(default=None)

    _additional_skip_redact: ClassVar[list[str]] = ["shard", "status", "checksum", "rejectedByReason"]

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._producer = PRODUCER

    @staticmethod
    def _get_schema() -> str:
        return f"{SCHEMA_URL}#/$defs/MagaShardRunFacet"


def dataset_name(uri: str) -> tuple[str, str]:
    """(namespace, name) of a storage URI under OpenLineage's naming: `s3://bucket` and
    the key, or `file` and the absolute path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return f"s3://{parsed.netloc}", parsed.path.lstrip("/")
    path = parsed.path if parsed.scheme == "file" else uri
    return "file", os.path.abspath(path)


def _input(uri: str) -> InputDataset:
    return InputDataset(*dataset_name(uri))


def _output(uri: str, rows: int | None = None) -> OutputDataset:
    facets = {}
    if rows is not None:
        facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=rows)
    return OutputDataset(*dataset_name(uri), outputFacets=facets)


def shard_record(summary: dict, recipe: Recipe, row: dict | None) -> dict:
    """What a COMPLETE event says of a shard, as plain data: the task's `summary`
    (`ShardOutcome.to_dict`) with the figures of its registry `row` (None for a trial,
    which is not registered: the summary's figures then) and the `recipe`."""
    figures = {name: (row if row is not None else summary).get(name) for name in _ROW_FIGURES}
    return {
        "recipe": {
            "recipeId": recipe.recipe_id, "model": recipe.model, "modelRevision": recipe.model_revision,
            "promptVersion": recipe.prompt_version,
        },
        "shard": summary["shard"],
        "status": row["status"] if row is not None else summary["status"],
        "source_uri": summary["source_uri"],
        "figures": figures,
        "quality_success": bool(summary.get("quality_success", False)),
        "failed_expectations": list(summary.get("failed_expectations") or []),
        "checksum": row["checksum"] if row is not None else summary.get("checksum"),
        # Figures come with files: a shard whose source was unusable has neither.
        "outputs": _output_uris(summary) if "documents" in summary else {},
    }


def _output_uris(summary: dict) -> dict[str, str]:
    """The shard's files by kind, beside its `data_uri` ({root}/{recipe_id}/data/{shard}.parquet,
    the root a trial's own for a trial)."""
    paths = shard_paths(summary["data_uri"].rsplit("/", 3)[0], summary["recipe_id"], summary["shard"])
    return {"data": paths.data, "rejected": paths.rejected, "magacorpus": paths.export}


def _shard_facet(record: dict) -> MagaShardRunFacet:
    figures = {key: record["figures"].get(name) for name, key in _ROW_FIGURES.items()}
    figures = {key: value for key, value in figures.items() if value is not None}
    accepted, rejected = figures.get("accepted", 0), figures.get("rejected", 0)
    return MagaShardRunFacet(
        shard=record["shard"],
        status=record["status"],
        yieldShare=round(accepted / (accepted + rejected), 4) if accepted + rejected else 0.0,
        qualityGatePassed=record["quality_success"],
        failedExpectations=record["failed_expectations"],
        checksum=record["checksum"],
        **figures,
    )


def shard_lineage(descriptor: dict, record: dict | None):
    """The provider's `OperatorLineage` of a shard task: the source shard from the task's
    shard `descriptor` (START, FAIL, or COMPLETE without a record), and with the task's
    `record` (`shard_record`) the shard's files and our facets."""
    from airflow.providers.openlineage.extractors import OperatorLineage

    source = (record or {}).get("source_uri") or descriptor.get("source_uri")
    lineage = OperatorLineage(inputs=[_input(source)] if source else [])
    if record is None:
        return lineage
    rows = {"data": record["figures"].get("accepted"), "rejected": record["figures"].get("rejected")}
    lineage.outputs = [_output(uri, rows.get(kind)) for kind, uri in record["outputs"].items()]
    lineage.run_facets = {"magaRecipe": MagaRecipeRunFacet(**record["recipe"]), "magaShard": _shard_facet(record)}
    return lineage


__all__ = [
    "PRODUCER",
    "SCHEMA_URL",
    "MagaRecipeRunFacet",
    "MagaShardRunFacet",
    "dataset_name",
    "shard_lineage",
    "shard_record",
]
