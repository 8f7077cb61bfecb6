"""Stages against the test LLM server: judge scores and the structured-output fallback."""

from __future__ import annotations

import asyncio

import pytest

from maga_tasks.llm.client import LLMClient
from maga_tasks.method.stages import StructuredOutputSupport, generate_pairs, judge, rewrite
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings

pytestmark = pytest.mark.integration

RECIPE = load_recipe()


async def _pairs_rewrite_judge(url: str, document: str):
    structured = StructuredOutputSupport("auto")
    async with LLMClient(RunSettings(endpoints=(url,)), RECIPE.model) as client:
        pairs = await generate_pairs(client, RECIPE, "s:doc-1", document, structured)
        rewritten = await rewrite(client, RECIPE, "s:doc-1", document, 0, pairs.pairs[0])
        related = await judge(client, RECIPE, "s:doc-1", document, rewritten.completion.text, 0, structured)
        unrelated = await judge(client, RECIPE, "s:doc-1", document, "Bananas grow in warm places. " * 5, 1, structured)
    return pairs, structured, related, unrelated


@pytest.mark.parametrize("server_flags", [[], ["--no-structured-outputs"]])
def test_judge_scores_related_above_unrelated(llm_server_factory, sample_articles, server_flags):
    server = llm_server_factory(extra=server_flags)
    pairs, structured, related, unrelated = asyncio.run(_pairs_rewrite_judge(server.url, sample_articles[7]["text"]))
    assert len(pairs.pairs) == RECIPE.pairs_per_document
    assert structured.enabled == (not server_flags)
    assert related.score is not None and unrelated.score is not None
    assert related.score >= 3 > unrelated.score
