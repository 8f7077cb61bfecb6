"""The judge's genre question measured on hand-labelled answers (`maga bench --suite
quality --judge-labels FILE`).

FILE is JSON lines of real rewrites, each with its source, genre, audience, the model's
output, a hand label (`good`, `off_genre`, ...) and a split (`tune`, `held_out`, `fresh`), as
`tests/fixtures/smollm2_outputs.jsonl`. Every rewrite is judged as a committed row would
be (the text the cleaning keeps), and the answers are counted per label and split: a judge
that can tell says "kept" for `good` rows and "not kept" for `off_genre` ones.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from maga_tasks.llm.client import LLMClient, run_client
from maga_tasks.method.cleaning import strip_boilerplate
from maga_tasks.method.stages import StructuredOutputSupport, judge
from maga_tasks.recipe import Recipe
from maga_tasks.settings import RunSettings

# What each labelled rewrite must carry, all strings.
LABELLED_FIELDS = ("source", "genre", "audience", "output", "label", "split")


def labelled_rewrites(path: str | Path) -> list[dict]:
    """The file's rewrite rows, each checked for its fields: a ValueError naming the file
    and line otherwise (the operator's file; the benchmark refuses it before it starts)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"labels file {path}: cannot be read ({type(error).__name__})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"labels file {path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"labels file {path}, line {number}: not a JSON object")
        if row.get("kind") != "rewrite":
            continue
        missing = [name for name in LABELLED_FIELDS if not isinstance(row.get(name), str)]
        if missing:
            raise ValueError(f"labels file {path}, line {number}: no text for {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"labels file {path}: no labelled rewrite (rows of kind \"rewrite\")")
    return rows


def check_judge_labels(path: str | Path, recipe: Recipe) -> list[dict]:
    """The labelled rewrites, once the recipe is known to ask the genre question: both
    refused in one line before any model runs."""
    if not recipe.judge_asks_genre:
        raise ValueError(f"recipe {recipe.name}: its judge task does not name {{genre}}, so it asks no genre question")
    return labelled_rewrites(path)


def genre_answers_by_label(rows: list[dict], recipe: Recipe, settings: RunSettings) -> dict:
    """{label: {split: {"rows", "answered", "kept"}}} of the judge's genre answers on
    `rows` (from `check_judge_labels`)."""

    async def judge_all():
        structured = StructuredOutputSupport(recipe.pairs.structured_output)
        async with LLMClient(settings, recipe.model, model_revision=recipe.model_revision) as client:
            await client.wait_ready(settings.all_down_timeout_s, min_context_tokens=recipe.required_context_tokens)
            return await asyncio.gather(*(
                judge(client, recipe, f"labels:{index}", row["source"], strip_boilerplate(row["output"])[0], 0,
                      structured, row["genre"], row["audience"])
                for index, row in enumerate(rows)
            ))

    table: dict[str, dict[str, dict[str, int]]] = {}
    for row, result in zip(rows, run_client(judge_all()), strict=True):
        cell = table.setdefault(row["label"], {}).setdefault(row["split"], {"rows": 0, "answered": 0, "kept": 0})
        cell["rows"] += 1
        cell["answered"] += result.genre_kept is not None
        cell["kept"] += bool(result.genre_kept)
    return table


def markdown_lines(table: dict) -> list[str]:
    lines = ["| label | split | rows | answered | said kept |", "|---|---|---:|---:|---:|"]
    for label in sorted(table):
        for split, cell in sorted(table[label].items()):
            lines.append(f"| {label} | {split} | {cell['rows']} | {cell['answered']} | {cell['kept']} |")
    return lines
