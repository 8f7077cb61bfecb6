"""A shard's figures (documents, accepted and rejected rows, tokens, characters, and the
fidelity counts behind its invented-fact, label-echo and genre-kept rates), one type with
one way of adding them up: over the checkpoint rows at commit, and over the committed
`data/` and `rejected/` files (a rerun, the output gate, the registration).

The fidelity rates (`fidelity_rates`), each a share in 0..1, None when nothing was
measured (a shard written before the fidelity checks, a recipe that does not run them):

- `invented_fact_rate`: of the model-written rewrites (accepted or rejected rows with a
  text) whose `invented_fact_count` was measured, the share with at least one number or
  name their source does not hold (`method.fidelity.invented_facts`).
- `label_echo_rate`: of the rewrites the `pair_label_echo` check judged, the share it
  rejected. The cleaning stops at a row's first failed check, so the check judges the
  accepted rows and those rejected by it or by a detector after it in the recipe's
  order (`cleaning.judged_by`); a row rejected earlier (truncated, drifted, ...) was
  never looked at for an echo, and counting it would dilute the rate. None when the
  recipe does not run the check.
- `genre_kept_rate`: of the accepted rows whose genre has a form cue a word check can
  see (`method.fidelity.GENRE_CUES`: a question-and-answer sheet, a letter, ...), the
  share that shows it. Genres without a cue (a news report, a story) are not counted.
  Only the question-and-answer and the letter cues reject rows (`off_genre`); the others
  are measured.

Each counts rows, one per pair: with `rewrite.samples` > 1 the draw a pair kept, not the
draws the cleaning discarded before it.

They are kept as counts (`fact_checked_rows`, `invented_fact_rows`, `echo_checked_rows`,
`label_echo_rows`, `genre_cue_rows`, `genre_kept_rows`) so that shards add up: a
recipe's rate is the sum of its shards' numerators over the sum of their denominators,
weighted by rows, never a mean of shard rates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from maga_tasks.data.committed import DERIVED
from maga_tasks.data.fidelity_rates import FIDELITY_COUNTS, FIDELITY_RATES, fidelity_rates
from maga_tasks.data.schema import DUPLICATE_ID
from maga_tasks.method.fidelity import genre_kept
from maga_tasks.reject_reasons import RejectReason

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
    "invented_fact_count",
)
# The accepted rows' figure columns: also whether each shows its genre's form cue,
# measured on `text` and `genre` by the reader (`data.committed.DERIVED`).
ACCEPTED_FIGURE_COLUMNS = (*FIGURE_COLUMNS, "genre_kept")



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
    # Fidelity counts (see the module doc and `fidelity_rates`).
    fact_checked_rows: int = 0  # rewrites with a text whose invented facts were counted
    invented_fact_rows: int = 0  # of those, with at least one invented number or name
    echo_checked_rows: int = 0  # rewrites the pair_label_echo check judged
    label_echo_rows: int = 0  # of those, rejected as pair_label_echo
    genre_cue_rows: int = 0  # accepted rows whose genre has a form cue
    genre_kept_rows: int = 0  # of those, showing it

    @property
    def invented_fact_rate(self) -> float | None:
        return fidelity_rates(asdict(self))["invented_fact_rate"]

    @property
    def label_echo_rate(self) -> float | None:
        return fidelity_rates(asdict(self))["label_echo_rate"]

    @property
    def genre_kept_rate(self) -> float | None:
        return fidelity_rates(asdict(self))["genre_kept_rate"]

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
        } | fidelity_rates(asdict(self))


class FigureTally:
    """Adds up `ShardFigures` one output row at a time, so a shard of any size streams."""

    def __init__(self, echo_judged_by: Collection[str] | None = None) -> None:
        """`echo_judged_by`: the reject reasons of rows the `pair_label_echo` check judged
        before they were rejected (`cleaning.judged_by`), None when the recipe does not
        run it (then no row counts as judged and the label-echo rate is None)."""
        self._source_chars: dict[Hashable, int] = {}  # per document
        self._rejects: Counter = Counter()
        self._accepted = self._prompt_tokens = self._completion_tokens = self._output_chars = 0
        self._echo_judged_by = None if echo_judged_by is None else frozenset(echo_judged_by)
        self._fidelity: Counter = Counter()

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
        self._add_fidelity(row, rejected)
        if rejected:
            self._rejects[row.get("reject_reason") or "unknown"] += 1
            return
        self._accepted += 1
        self._output_chars += (row["text_chars"] or 0) if "text_chars" in row else len(row.get("text") or "")

    def _add_fidelity(self, row: Mapping[str, Any], rejected: bool) -> None:
        """The fidelity counts of one row. `invented_fact_count` is set on every row with
        a text since the fidelity checks exist: a row without it was not measured."""
        facts = row.get("invented_fact_count")
        if isinstance(facts, int) and not isinstance(facts, bool):  # a file of another writer may hold anything
            self._fidelity["fact_checked_rows"] += 1
            self._fidelity["invented_fact_rows"] += facts > 0
            reason = row.get("reject_reason") if rejected else None
            if self._echo_judged_by is not None and (not rejected or reason in self._echo_judged_by):
                self._fidelity["echo_checked_rows"] += 1
                self._fidelity["label_echo_rows"] += reason == RejectReason.PAIR_LABEL_ECHO
        if rejected:
            return
        if "genre_kept" in row:
            kept = row["genre_kept"]
        elif isinstance(row.get("text"), str) and isinstance(row.get("genre"), str):
            kept = genre_kept(row["text"], row["genre"])
        else:  # a reader that kept neither: not measured
            kept = None
        if kept is not None:
            self._fidelity["genre_cue_rows"] += 1
            self._fidelity["genre_kept_rows"] += bool(kept)

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
            **{name: int(self._fidelity[name]) for name in FIDELITY_COUNTS},
        )


def figures_of_files(
    data: pa.Table, rejected: pa.Table, echo_judged_by: Collection[str] | None = None
) -> ShardFigures:
    """The figures of a committed shard from its `data/` and `rejected/` tables (the
    figure columns they hold; a missing one counts as 0; `genre_kept` measured from
    `text` and `genre` when the table has them instead). Documents are told apart by
    their `source_id`, the only document key the files keep. `echo_judged_by` as for
    `FigureTally`."""
    tally = FigureTally(echo_judged_by)
    for table, is_rejected in ((data, False), (rejected, True)):
        if "text" in table.column_names and "text_chars" not in table.column_names:
            # Measured in arrow: no text becomes a Python string.
            table = table.append_column("text_chars", pc.utf8_length(table.column("text")))
        wanted = FIGURE_COLUMNS if is_rejected else ACCEPTED_FIGURE_COLUMNS
        if not is_rejected and "genre_kept" not in table.column_names and {"text", "genre"} <= set(table.column_names):
            table = table.append_column("genre_kept", DERIVED["genre_kept"][1](table))
        # Batch by batch: only one batch of rows becomes Python objects at a time.
        for batch in table.select([c for c in wanted if c in table.column_names]).to_batches(8192):
            for row in batch.to_pylist():
                tally.add(row, rejected=is_rejected)
    return tally.figures()


__all__ = [
    "ACCEPTED_FIGURE_COLUMNS",
    "FIDELITY_COUNTS",
    "FIDELITY_RATES",
    "FIGURE_COLUMNS",
    "FigureTally",
    "ShardFigures",
    "fidelity_rates",
    "figures_of_files",
]
