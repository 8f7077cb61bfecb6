"""One shard's job: which source, under which recipe, where its files go and how storage
is reached. Built once where a shard's work starts (the entry points of `engine.publish`,
`engine.trial` and `engine.shard`, whose signatures the DAG and the CLI call) and passed
whole, instead of recomputing its paths from `(output_root, recipe_id, shard or
shard_name(uri))` and threading the S3 endpoint through every call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maga_tasks.data.layout import ShardPaths, shard_name, shard_paths
from maga_tasks.data.source import DEFAULT_COLUMNS, SourceColumns
from maga_tasks.data.storage import Storage, read_once, storage_for
from maga_tasks.method.cleaning import echo_judged_by
from maga_tasks.quality import CommittedShard, QualityReport, load_committed, validate_input, validate_output
from maga_tasks.quality.datadocs import DATA_DOCS_SAMPLE_RATE
from maga_tasks.recipe import Recipe
from maga_tasks.settings import RunSettings

if TYPE_CHECKING:
    from maga_tasks.data.outcome import ShardResult



@dataclass(frozen=True)
class ShardJob:
    """One source shard to expand, gate, commit or register under one recipe."""

    source_uri: str
    recipe: Recipe
    paths: ShardPaths
    columns: SourceColumns = SourceColumns()
    s3_endpoint_url: str | None = None
    data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE

    @classmethod
    def of(
        cls,
        source_uri: str,
        output_root: str,
        recipe: Recipe,
        *,
        shard: str | None = None,
        columns: SourceColumns = DEFAULT_COLUMNS,
        settings: RunSettings | None = None,
        s3_endpoint_url: str | None = None,
        data_docs_sample_rate: float = DATA_DOCS_SAMPLE_RATE,
    ) -> ShardJob:
        """The job of `source_uri` with its files under `output_root`; `shard` names them
        (default: from the file's name). `settings`, when given, supply the S3 endpoint
        and the Data Docs sample rate."""
        if settings is not None:
            s3_endpoint_url, data_docs_sample_rate = settings.s3_endpoint_url, settings.data_docs_sample_rate
        paths = shard_paths(output_root, recipe.recipe_id, shard or shard_name(source_uri))
        return cls(source_uri, recipe, paths, columns, s3_endpoint_url, data_docs_sample_rate)

    @property
    def shard(self) -> str:
        return self.paths.shard

    @property
    def recipe_id(self) -> str:
        return self.recipe.recipe_id

    @property
    def output_root(self) -> str:
        return self.paths.output_root

    def storage(self) -> Storage:
        """Where the shard's outputs (and its `_work/`) are written."""
        return storage_for(self.paths.output_root, self.s3_endpoint_url)

    def source_storage(self) -> Storage:
        return storage_for(self.source_uri, self.s3_endpoint_url)

    def load_committed(self) -> CommittedShard:
        """The job's committed `data/` and `rejected/` files, read for the output gate."""
        return load_committed(self.paths, self.s3_endpoint_url, echo_judged_by=echo_judged_by(self.recipe.cleaning))

    def input_gate(self) -> QualityReport:
        """The input gate on the job's source shard."""
        return validate_input(
            self.source_uri, self.recipe, self.paths, columns=self.columns, s3_endpoint_url=self.s3_endpoint_url,
            data_docs_sample_rate=self.data_docs_sample_rate,
        )

    def output_gate(self, committed: CommittedShard, result: ShardResult | None) -> QualityReport:
        """The output gate on the job's committed files (`result`: what they must hold)."""
        return validate_output(
            committed, self.recipe, result=result, s3_endpoint_url=self.s3_endpoint_url,
            data_docs_sample_rate=self.data_docs_sample_rate,
        )


def reading_source_once(function):
    """`function(source_uri, ...)` with its S3 source downloaded once: the input gate,
    the expansion and the judge each read it (`read_once`)."""

    @functools.wraps(function)
    def reading(*args, **kwargs):
        with read_once(args[0] if args else kwargs["source_uri"]):
            return function(*args, **kwargs)

    return reading


__all__ = ["ShardJob", "reading_source_once"]
