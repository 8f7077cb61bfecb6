"""Pairs chosen from a recipe's catalogue (the small-model recipe): one call per pair, each
offered only the entries not chosen yet, against the test LLM server on loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.shard import expand_shard
from maga_tasks.errors import FleetRefused
from maga_tasks.llm.client import LLMClient
from maga_tasks.method.stages import StructuredOutputSupport, generate_pairs
from maga_tasks.recipe import RecipeError, builtin_recipe_path, load_recipe, recipe_from_dict
from maga_tasks.settings import RunSettings

pytestmark = pytest.mark.integration

GENRES = [f"a kind of text number {i} for the test" for i in range(7)]
AUDIENCES = [f"readers of group number {i} in the test" for i in range(6)]


def catalogue_recipe(**pairs):
    data = load_recipe().model_dump(mode="json")
    data["pairs"].update(structured_output="json_schema", catalogue={"genres": GENRES, "audiences": AUDIENCES}, **pairs)
    return recipe_from_dict(data)


async def _choose(url: str, recipe, document: str):
    async with LLMClient(RunSettings(endpoints=(url,)), recipe.model) as client:
        return await generate_pairs(client, recipe, "s:doc-1", document, StructuredOutputSupport("json_schema"))


def test_each_pair_is_a_distinct_catalogue_entry_chosen_in_its_own_call(llm_server_factory, sample_articles):
    server = llm_server_factory()
    recipe = catalogue_recipe()
    result = asyncio.run(_choose(server.url, recipe, sample_articles[3]["text"]))
    assert result.reject_reason is None and len(result.pairs) == recipe.pairs_per_document
    genres, audiences = [p.genre for p in result.pairs], [p.audience for p in result.pairs]
    assert set(genres) <= set(GENRES) and len(set(genres)) == len(genres)
    assert set(audiences) <= set(AUDIENCES) and len(set(audiences)) == len(audiences)
    assert server.stats()["by_stage"]["pairs"] == recipe.pairs_per_document
    again = asyncio.run(_choose(server.url, recipe, sample_articles[3]["text"]))
    assert again.pairs == result.pairs  # seeded: a rerun asks for the same choices


def test_a_fleet_without_structured_outputs_fails_the_shard_and_rejects_nothing(tmp_path, llm_server_factory):
    server = llm_server_factory(extra=["--no-structured-outputs"])
    recipe = catalogue_recipe()
    source = write_sample_corpus(tmp_path / "src", 1, 4)[0]
    with pytest.raises(FleetRefused, match="needs structured outputs"):
        expand_shard(str(source), str(tmp_path / "out"), recipe, RunSettings(endpoints=(server.url,)))
    paths = shard_paths(str(tmp_path / "out"), recipe.recipe_id, source.stem)
    assert not Path(paths.data).exists() and not Path(paths.rejected).exists()


def test_a_catalogue_shard_expands_every_document_into_distinct_pairs(tmp_path, llm_server_factory):
    server = llm_server_factory()
    recipe = catalogue_recipe()
    source = write_sample_corpus(tmp_path / "src", 1, 6)[0]
    result = expand_shard(str(source), str(tmp_path / "out"), recipe, RunSettings(endpoints=(server.url,)))
    paths = shard_paths(str(tmp_path / "out"), recipe.recipe_id, result.shard)
    rows = pq.read_table(paths.data).to_pylist() + pq.read_table(paths.rejected).to_pylist()
    by_source: dict[str, set] = {}
    for row in rows:
        assert not (row.get("reject_reason") or "").startswith("pairs_"), row.get("reject_reason")
        assert row["genre"] in GENRES and row["audience"] in AUDIENCES
        by_source.setdefault(row["source_id"], set()).add((row["genre"], row["audience"]))
    assert len(by_source) == 6 and all(len(pairs) == recipe.pairs_per_document for pairs in by_source.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"structured_output": "auto"}, "needs structured_output: json_schema"),
        ({"catalogue": {"genres": GENRES[:3], "audiences": AUDIENCES}}, "at least pairs_per_document"),
        ({"catalogue": {"genres": GENRES + [GENRES[0].upper()], "audiences": AUDIENCES}}, "must be distinct"),
    ],
)
def test_a_catalogue_the_method_cannot_use_is_refused_on_load(change, message):
    data = load_recipe().model_dump(mode="json")
    data["pairs"].update(structured_output="json_schema", catalogue={"genres": GENRES, "audiences": AUDIENCES})
    data["pairs"].update(change)
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_the_small_model_recipe_catalogue_entries_read_as_descriptions():
    from maga_tasks.method.detectors import junk_description

    recipe = load_recipe(builtin_recipe_path("smollm2-135m"))
    catalogue = recipe.pairs.catalogue
    assert len(catalogue.genres) >= 2 * recipe.pairs_per_document
    for value, label in [(g, "genre") for g in catalogue.genres] + [(a, "audience") for a in catalogue.audiences]:
        assert junk_description(value, label) is None, (value, json.dumps(junk_description(value, label)))
