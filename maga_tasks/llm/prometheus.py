"""The Prometheus text format that vLLM's `/metrics` speaks: parsed to one total per
metric name. Read by the client's adaptive windows (`llm.windows`) and by the local
launcher and benchmarks (`llm.vllm_local`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

# One sample line of the Prometheus text format: name, optional {labels} (label values
# are quoted and may hold spaces, braces or escaped quotes), value, optional timestamp.
_SAMPLE = re.compile(
    r'^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)'
    r'(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?'
    r'\s+(?P<value>\S+)(?:\s+\S+)?\s*$'
)


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Sum the samples of each metric name over all label sets.

    Counters and gauges come out as server totals (e.g. the prompt tokens of every
    model and engine). Histograms keep their `_sum`, `_count` and `_bucket` names;
    only the first two are meaningful once summed. `*_created` samples (creation
    timestamps of counters) are left out: a sum of timestamps means nothing.
    """
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match or match["name"].endswith("_created"):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        if math.isnan(value):
            continue
        totals[match["name"]] = totals.get(match["name"], 0.0) + value
    return totals


def prefix_cache_hit_rate(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """Share of prompt tokens served from the prefix cache between two metric reads."""
    queries = after.get("vllm:prefix_cache_queries_total", 0.0) - before.get("vllm:prefix_cache_queries_total", 0.0)
    hits = after.get("vllm:prefix_cache_hits_total", 0.0) - before.get("vllm:prefix_cache_hits_total", 0.0)
    return hits / queries if queries > 0 else None
