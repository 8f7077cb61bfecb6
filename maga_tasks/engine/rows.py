"""A shard's output rows: the layout of one row (accepted and rejected share the
columns, `data.schema` types them) and the batched parquet writer the commit streams
them through."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from maga_tasks.data.schema import DUPLICATE_ID, row_id
from maga_tasks.data.source import SourceDocument
from maga_tasks.method.cleaning import Verdict
from maga_tasks.method.stages import RewriteResult, Usage
from maga_tasks.recipe import Recipe

# Rows buffered before they are written: a commit's memory follows this, not the shard.
COMMIT_BATCH_ROWS = 500


@dataclass
class Draws:
    """The samples drawn for one pair: the one it keeps (`result`, its cleaning `verdict`:
    None when no sample got an answer), how many were drawn, and the usage of the samples
    the cleaning rejected before the kept one (spent, so counted on the pair's row)."""

    result: RewriteResult | None = None
    verdict: Verdict | None = None
    samples: int = 1
    discarded: Usage = field(default_factory=Usage)


class RowMaker:
    """Builds the output rows of one document of shard `shard`."""

    def __init__(self, recipe: Recipe, shard: str, model: str, doc: SourceDocument):
        self.recipe = recipe
        self.shard = shard
        self.model = model
        self.doc = doc
        self.source_truncated_tokens = None
        self.created_at = datetime.now(timezone.utc).isoformat()

    def row(
        self, pair_index, pair, text, completion, pairs_usage, reason=None, detail="", coverage=None, invented=None,
        draws: Draws | None = None,
    ) -> dict:
        recipe, doc = self.recipe, self.doc
        discarded = draws.discarded if draws else Usage()
        return {
            # A repeated source id's rows carry the row's position: ids stay unique.
            "id": row_id(
                recipe.recipe_id, self.shard, doc.source_id, pair_index,
                doc.index if doc.problem == DUPLICATE_ID else None,
            ),
            "source_id": doc.source_id,
            "source_shard": self.shard,
            "pair_index": pair_index,
            "genre": pair.genre if pair else None,
            "audience": pair.audience if pair else None,
            "text": text,
            "recipe_id": recipe.recipe_id,
            "model": self.model,
            "prompt_version": recipe.prompt_version,
            "prompt_tokens": (completion.prompt_tokens if completion else 0) + discarded.prompt_tokens,
            "completion_tokens": (completion.completion_tokens if completion else 0) + discarded.completion_tokens,
            "rewrite_samples": draws.samples if draws else None,
            "pairs_prompt_tokens": pairs_usage.prompt_tokens if pairs_usage else 0,
            "pairs_completion_tokens": pairs_usage.completion_tokens if pairs_usage else 0,
            "finish_reason": completion.finish_reason if completion else None,
            "keyword_coverage": coverage,
            "invented_fact_count": invented,
            "source_chars": len(doc.text) if isinstance(doc.text, str) else 0,
            "source_truncated_tokens": self.source_truncated_tokens,
            "source_meta": json.dumps(doc.meta, ensure_ascii=False, default=str) if doc.meta else None,
            "created_at": self.created_at,
            "reject_reason": reason,
            "reject_detail": detail or None,
        }

    def all_rejected(self, reason: str, detail: str, usage: Usage) -> list[dict]:
        """A document-level rejection: one rejected row per pair index, nothing lost."""
        return [
            self.row(i, None, None, None, usage if i == 0 else None, reason, detail)
            for i in range(self.recipe.pairs_per_document)
        ]


class BatchedWriter:
    """A parquet file written `COMMIT_BATCH_ROWS` rows at a time (zstd)."""

    def __init__(self, path: Path, schema):
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.buffer: list[dict] = []
        self.rows = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= COMMIT_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            for row in self.buffer:
                if "created_at" in row:
                    row["created_at"] = datetime.fromisoformat(row["created_at"])
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.rows += len(self.buffer)
            self.buffer.clear()

    def __enter__(self) -> BatchedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.writer.close()


__all__ = ["COMMIT_BATCH_ROWS", "BatchedWriter", "Draws", "RowMaker"]
