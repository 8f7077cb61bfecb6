"""Genre and audience labels of a shard's accepted rows: each description cut to its
opening words and counted, for the registry's label summary and the dashboard."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")
_CLAUSE_END = re.compile(r"[.,;:!?\n(]|\s[-\u2013\u2014]\s")
_ARTICLES = {"a", "an", "the"}
# Words a label must not end on when it is cut: "radio script read aloud by a" reads as a
# label of its own; "radio script read aloud…" says it goes on.
_DANGLING = _ARTICLES | {
    "about", "and", "as", "at", "by", "for", "from", "in", "into", "of", "on", "or", "than", "that",
    "the", "their", "to", "who", "with", "which", "whose",
}


def short_label(description: str | None, words: int = 12) -> str:
    """A genre or audience description cut to its first clause, for counting:
    'A step-by-step tutorial, friendly in tone...' -> 'step-by-step tutorial'. A clause
    longer than `words` is cut between words, never after a dangling article or
    preposition, and ends in '…' (a recipe's catalogue entries fit whole)."""
    if not description or not description.strip():
        return "(none)"
    first = _CLAUSE_END.split(description.strip().lstrip(string.punctuation + " "), maxsplit=1)[0]
    tokens = _WORD.findall(first.lower())
    while tokens and tokens[0] in _ARTICLES:
        tokens.pop(0)
    if len(tokens) <= words:
        return " ".join(tokens) or "(none)"
    kept = tokens[:words]
    while len(kept) > 1 and kept[-1] in _DANGLING:
        kept.pop()
    return " ".join(kept) + "…"


class LabelTally:
    """Counts the genre and audience labels of accepted rows batch by batch, so a
    shard's descriptions are never held whole."""

    def __init__(self) -> None:
        self.rows = 0
        self.labels = {"genres": Counter(), "audiences": Counter()}
        self.present = {"genres": False, "audiences": False}
        self.pair_index: Counter = Counter()

    def add(self, columns: dict[str, list]) -> None:
        """One batch of rows, as lists by column name (`genre`, `audience`, `pair_index`)."""
        count = len(next(iter(columns.values()))) if columns else 0
        self.rows += count
        for column, key in (("genre", "genres"), ("audience", "audiences")):
            if column in columns:
                self.present[key] = True
                self.labels[key].update(short_label(v if isinstance(v, str) else None) for v in columns[column])
        if "pair_index" in columns:
            self.pair_index.update(columns["pair_index"])

    def summary(self, top: int = 10) -> dict:
        """Top genre and audience labels, for the registry."""
        out: dict[str, Any] = {"rows": self.rows}
        for key, labels in self.labels.items():
            if not self.present[key] or not self.rows:
                out[key], out[f"distinct_{key}"] = [], 0
                continue
            out[key] = [[label, count] for label, count in labels.most_common(top)]
            out[f"distinct_{key}"] = len(labels)
        if self.pair_index and self.rows:
            out["pair_index"] = {str(k): int(v) for k, v in sorted(self.pair_index.items())}
        return out


def label_summary(rows: pd.DataFrame, top: int = 10) -> dict:
    """Top genre and audience labels of a frame of accepted rows, for the registry."""
    tally = LabelTally()
    tally.add({c: rows[c].tolist() for c in ("genre", "audience", "pair_index") if c in rows})
    if not tally.rows:
        tally.rows = len(rows)
    return tally.summary(top)


__all__ = ["LabelTally", "label_summary", "short_label"]
