"""Stages against the test LLM server: judge scores and the structured-output fallback."""

from __future__ import annotations

import asyncio

import pytest

from maga_tasks.llm.client import LLMClient
from maga_tasks.method.cleaning import strip_boilerplate
from maga_tasks.method.stages import StructuredOutputSupport, generate_pairs, judge, rewrite
from maga_tasks.recipe import load_recipe, recipe_from_dict
from maga_tasks.settings import RunSettings
from maga_tasks.tools.judge_labels import check_judge_labels, genre_answers_by_label
from maga_tasks.tools.test_server.answers import genre_named
from tests.support.paths import FIXTURES_DIR

pytestmark = pytest.mark.integration

RECIPE = load_recipe()
BANANAS = "Bananas grow in warm places. " * 5


async def _pairs_rewrite_judge(url: str, document: str, recipe=RECIPE):
    structured = StructuredOutputSupport("auto")
    async with LLMClient(RunSettings(endpoints=(url,)), recipe.model) as client:
        pairs = await generate_pairs(client, recipe, "s:doc-1", document, structured)
        pair = pairs.pairs[0]
        rewritten = await rewrite(client, recipe, "s:doc-1", document, 0, pair)
        text = rewritten.completion.text
        related = await judge(client, recipe, "s:doc-1", document, text, 0, structured, pair.genre, pair.audience)
        unrelated = await judge(client, recipe, "s:doc-1", document, BANANAS, 1, structured, pair.genre, pair.audience)
    return pairs, structured, (related, text), unrelated


@pytest.mark.parametrize("server_flags", [[], ["--no-structured-outputs"]])
def test_judge_scores_related_above_unrelated(llm_server_factory, sample_articles, server_flags):
    server = llm_server_factory(extra=server_flags)
    pairs, structured, (related, text), unrelated = asyncio.run(
        _pairs_rewrite_judge(server.url, sample_articles[7]["text"])
    )
    assert len(pairs.pairs) == RECIPE.pairs_per_document
    assert structured.enabled == (not server_flags)
    assert related.score is not None and unrelated.score is not None
    assert related.score >= 3 > unrelated.score
    # The genre question is asked and its answer kept apart from the score (the test
    # server says "kept" when the text names the genre's first long word).
    # (Its honest rewrite opens by naming its form; the bananas do not.)
    assert related.genre_kept is genre_named(pairs.pairs[0].genre, text) is True
    assert unrelated.genre_kept is genre_named(pairs.pairs[0].genre, BANANAS) is False


def test_a_judge_task_that_names_no_genre_gets_no_genre_answer(llm_server, sample_articles):
    data = RECIPE.model_dump(mode="json")
    data["prompts"]["judge"] = data["prompts"]["judge"].replace("Genre: {genre}\n", "")
    recipe = recipe_from_dict(data)
    assert not recipe.judge_asks_genre
    _, _, (related, _), unrelated = asyncio.run(
        _pairs_rewrite_judge(llm_server.url, sample_articles[7]["text"], recipe)
    )
    assert related.score >= 3 and related.genre_kept is None and unrelated.genre_kept is None


def test_the_judge_labels_bench_counts_the_genre_answers_by_label(llm_server):
    """`maga bench --suite quality --judge-labels`'s count: every labelled rewrite judged
    as a committed row would be, its genre answer counted under its label and split."""
    rows = check_judge_labels(FIXTURES_DIR / "smollm2_outputs.jsonl", RECIPE)[:24]
    table = genre_answers_by_label(rows, RECIPE, RunSettings(endpoints=(llm_server.url,)))
    expected: dict = {}
    for row in rows:
        cell = expected.setdefault(row["label"], {}).setdefault(row["split"], {"rows": 0, "answered": 0, "kept": 0})
        cell["rows"] += 1
        cell["answered"] += 1
        cell["kept"] += genre_named(row["genre"], strip_boilerplate(row["output"])[0])
    assert table == expected
    assert 0 < sum(c["kept"] for cells in table.values() for c in cells.values()) < len(rows)
