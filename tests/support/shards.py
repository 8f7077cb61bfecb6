"""Shards as the pipeline writes them: a committed shard (`data/` + `rejected/` with the
output schemas, faults injected on demand) and source shards from explicit rows."""

from __future__ import annotations

from pathlib import Path

GENRES = (
    "A step-by-step tutorial that teaches the topic in plain language. It builds from basics to details.",
    "An analytical report with headings and evidence. The tone is neutral and precise.",
    "A friendly dialogue between a teacher and a curious student. It explains by questions and answers.",
    "A short story that carries the facts through characters. The tone is warm.",
    "A Q&A sheet for quick revision. Each answer is short and direct.",
)
AUDIENCES = (
    "High-school students preparing for exams. They know little about the subject.",
    "Retired engineers who read for pleasure. They like precise numbers.",
    "Busy parents with no background in the field. They want the essentials.",
    "University students in history. They want context and sources.",
    "Curious children aged ten to twelve. They like vivid examples.",
)


def write_committed_shard(
    output_root,
    recipe,
    shard: str,
    *,
    documents: int = 6,
    accepted_per_document: int | None = None,
    defects: tuple[str, ...] = (),
) -> "tuple[str, str]":
    """Write a realistic committed shard (`data/` + `rejected/` parquet with the output
    schemas) as expand_shard would; `defects` injects faults:
    duplicate_ids, empty_texts, low_coverage, low_yield, truncated."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from maga_tasks.data.layout import shard_paths
    from maga_tasks.data.schema import ACCEPTED_SCHEMA, REJECTED_SCHEMA, row_id

    pairs = recipe.pairs_per_document
    keep = accepted_per_document if accepted_per_document is not None else pairs - 1
    if "low_yield" in defects:
        keep = 1
    now = datetime(2026, 11, 1, 2, 0, tzinfo=timezone.utc)
    accepted, rejected = [], []
    for d in range(documents):
        source_id = f"doc-{d:04d}"
        source = (
            f"Document {d} explains how river deltas form where sediment settles as the current slows. "
            "Deltas shift over centuries, feed wetlands and farms, and are threatened by dams and rising seas. "
        ) * 2
        for p in range(pairs):
            text = (
                f"[{GENRES[p % len(GENRES)].split('.')[0]}] Rewrite {p} of document {d}: river deltas form where "
                "a slowing current drops its sediment. Over centuries they shift, feed wetlands and farmland, "
                "and today dams and rising seas threaten them. "
            ) * 2
            row = {
                "id": row_id(recipe.recipe_id, shard, source_id, p),
                "source_id": source_id,
                "source_shard": shard,
                "pair_index": p,
                "genre": GENRES[p % len(GENRES)],
                "audience": AUDIENCES[(p + d) % len(AUDIENCES)],
                "text": text,
                "recipe_id": recipe.recipe_id,
                "model": recipe.model,
                "prompt_version": recipe.prompt_version,
                "prompt_tokens": 220,
                "completion_tokens": len(text) // 4,
                "pairs_prompt_tokens": 180 if p == 0 else 0,
                "pairs_completion_tokens": 150 if p == 0 else 0,
                "finish_reason": "stop",
                "keyword_coverage": 0.6,
                "source_chars": len(source),
                "source_truncated_tokens": None,
                "source_meta": '{"title": "River deltas"}',
                "created_at": now,
            }
            if p < keep:
                accepted.append(row)
            else:
                rejected.append(row | {"reject_reason": "low_keyword_coverage", "reject_detail": "coverage 0.05"})
    if "duplicate_ids" in defects:
        accepted[1]["id"] = accepted[0]["id"]
    if "empty_texts" in defects:
        for row in accepted[:3]:
            row["text"] = ""
    if "low_coverage" in defects:
        for row in accepted[: len(accepted) // 2]:
            row["keyword_coverage"] = 0.05
    if "truncated" in defects:
        accepted[0]["finish_reason"] = "length"
    paths = shard_paths(str(output_root), recipe.recipe_id, shard)
    for uri, rows, schema in ((paths.data, accepted, ACCEPTED_SCHEMA), (paths.rejected, rejected, REJECTED_SCHEMA)):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), uri)
    return paths.data, paths.rejected


def write_source_shard(path, rows: list[dict]) -> str:
    """A source parquet shard from explicit rows (id/text and any other columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def committed_source(tmp_path, shard="part-0000", **kwargs) -> tuple[str, str]:
    """A source file path and an output root where that shard is already committed
    (under the default recipe)."""
    from maga_tasks.recipe import load_recipe

    out = str(tmp_path / "out")
    write_committed_shard(out, load_recipe(), shard, **kwargs)
    return str(tmp_path / "source" / f"{shard}.parquet"), out
