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


def short_label(description: str | None, words: int = 6) -> str:
    """A genre or audience description cut to its opening words, for counting:
    'A step-by-step tutorial, friendly in tone...' -> 'step-by-step tutorial'."""
    if not description or not description.strip():
        return "(none)"
    first = _CLAUSE_END.split(description.strip().lstrip(string.punctuation + " "), maxsplit=1)[0]
    tokens = _WORD.findall(first.lower())
    while tokens and tokens[0] in _ARTICLES:
        tokens.pop(0)
    return " ".join(tokens[:words]) or "(none)"


def label_summary(rows: pd.DataFrame, top: int = 10) -> dict:
    """Top genre and audience labels of a shard's accepted rows, for the registry."""
    out: dict[str, Any] = {"rows": len(rows)}
    for column, key in (("genre", "genres"), ("audience", "audiences")):
        if column not in rows or not len(rows):
            out[key], out[f"distinct_{key}"] = [], 0
            continue
        labels = Counter(short_label(value if isinstance(value, str) else None) for value in rows[column])
        out[key] = [[label, count] for label, count in labels.most_common(top)]
        out[f"distinct_{key}"] = len(labels)
    if "pair_index" in rows and len(rows):
        out["pair_index"] = {str(k): int(v) for k, v in sorted(rows["pair_index"].value_counts().items())}
    return out


__all__ = ["label_summary", "short_label"]
