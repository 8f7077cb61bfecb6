"""The fidelity rates of a shard or of a recipe, from their counts (defined in
`data.figures`): plain Python, so the registry and the dashboard read them without
loading arrow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The counts behind the fidelity rates, as `ShardFigures` fields and registry columns.
FIDELITY_COUNTS = (
    "fact_checked_rows",
    "invented_fact_rows",
    "echo_checked_rows",
    "label_echo_rows",
    "genre_cue_rows",
    "genre_kept_rows",
)
# rate -> (numerator, denominator) of `FIDELITY_COUNTS`.
FIDELITY_RATES = {
    "invented_fact_rate": ("invented_fact_rows", "fact_checked_rows"),
    "label_echo_rate": ("label_echo_rows", "echo_checked_rows"),
    "genre_kept_rate": ("genre_kept_rows", "genre_cue_rows"),
}


def fidelity_rates(counts: Mapping[str, Any]) -> dict[str, float | None]:
    """The three fidelity rates of `FIDELITY_COUNTS` (a shard's, or sums over shards):
    None where the denominator is 0 or missing (a registry row from before the counts)."""
    rates = {}
    for rate, (part, whole) in FIDELITY_RATES.items():
        total = counts.get(whole)
        rates[rate] = round((counts.get(part) or 0) / total, 4) if total else None
    return rates


__all__ = ["FIDELITY_COUNTS", "FIDELITY_RATES", "fidelity_rates"]
