"""A shard's figures (documents, accepted and rejected rows, tokens, characters), one
type with one way of adding them up: over the checkpoint rows at commit, and over the
committed `data/` and `rejected/` files (a rerun, the output gate, the registration).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from maga_tasks.data.schema import DUPLICATE_ID

# The output columns the figures are made of; `text_chars` stands for `text` where a
# reader measured the texts instead of keeping them.
FIGURE_COLUMNS = (
    "source_id",
    "source_chars",
    "prompt_tokens",
    "completion_tokens",
    "pairs_prompt_tokens",
    "pairs_completion_tokens",
    "reject_reason",
    "text_chars",
)


@dataclass
class ShardFigures:
    """Counts of one shard: what the registry keeps and the output gate checks."""

    documents: int = 0
    accepted: int = 0
    rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0  # rewrite and pairs calls
    completion_tokens: int = 0
    source_chars: int = 0
    output_chars: int = 0  # of the accepted rewrites

    @property
    def expansion_ratio(self) -> float:
        """Accepted output characters per source character."""
        return round(self.output_chars / self.source_chars, 4) if self.source_chars else 0.0

    @property
    def accepted_per_document(self) -> float:
        return round(self.accepted / self.documents, 4) if self.documents else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {
            "expansion_ratio": self.expansion_ratio,
            "accepted_per_document": self.accepted_per_document,
        }


class FigureTally:
    """Adds up `ShardFigures` one output row at a time, so a shard of any size streams."""

    def __init__(self) -> None:
        self._source_chars: dict[Hashable, int] = {}  # per document
        self._rejects: Counter = Counter()
        self._accepted = self._prompt_tokens = self._completion_tokens = self._output_chars = 0

    def add(self, row: Mapping[str, Any], *, rejected: bool, document: Hashable | None = None) -> None:
        """Count one data or rejected row (output columns, `text` or `text_chars`).

        Rows of one source document share `document`, by default their `source_id`;
        the expansion passes the document's position. The rows of a repeated id
        (`duplicate_id`) are counted as rejected rows but belong to no document: the
        first row with that id is the document. Missing values count as 0."""
        if row.get("reject_reason") != DUPLICATE_ID:
            key = row.get("source_id") if document is None else document
            self._source_chars[key] = max(self._source_chars.get(key, 0), row.get("source_chars") or 0)
        self._prompt_tokens += (row.get("prompt_tokens") or 0) + (row.get("pairs_prompt_tokens") or 0)
        self._completion_tokens += (row.get("completion_tokens") or 0) + (row.get("pairs_completion_tokens") or 0)
        if rejected:
            self._rejects[row.get("reject_reason") or "unknown"] += 1
            return
        self._accepted += 1
        self._output_chars += (row["text_chars"] or 0) if "text_chars" in row else len(row.get("text") or "")

    def figures(self) -> ShardFigures:
        """The figures of the rows added so far."""
        return ShardFigures(
            documents=len(self._source_chars),
            accepted=self._accepted,
            rejected=sum(self._rejects.values()),
            rejects_by_reason=dict(self._rejects.most_common()),
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            source_chars=sum(self._source_chars.values()),
            output_chars=self._output_chars,
        )


def figures_of_files(data: pa.Table, rejected: pa.Table) -> ShardFigures:
    """The figures of a committed shard from its `data/` and `rejected/` tables (the
    figure columns they hold; a missing one counts as 0). Documents are told apart by
    their `source_id`, the only document key the files keep."""
    tally = FigureTally()
    for table, is_rejected in ((data, False), (rejected, True)):
        if "text" in table.column_names and "text_chars" not in table.column_names:
            # Measured in arrow: no text becomes a Python string.
            table = table.append_column("text_chars", pc.utf8_length(table.column("text")))
        # Batch by batch: only one batch of rows becomes Python objects at a time.
        for batch in table.select([c for c in FIGURE_COLUMNS if c in table.column_names]).to_batches(8192):
            for row in batch.to_pylist():
                tally.add(row, rejected=is_rejected)
    return tally.figures()


__all__ = ["FIGURE_COLUMNS", "FigureTally", "ShardFigures", "figures_of_files"]
