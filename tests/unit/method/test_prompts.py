"""Prompt layout: the requests of one document share their leading prefix."""

from __future__ import annotations

import os

from maga_tasks.method.prompts import (
    JUDGE_JSON_SCHEMA,
    document_from_messages,
    judge_json_schema,
    judge_messages,
    pairs_messages,
    rewrite_messages,
)
from maga_tasks.recipe import load_recipe

RECIPE = load_recipe()
DOC = "The Amazon river flows through Brazil. It carries more water than any other river {with braces}."


def flat(messages) -> str:
    return "\n".join(m["role"] + ":" + m["content"] for m in messages)


def test_all_requests_of_a_document_share_instructions_and_document_first():
    requests = [pairs_messages(RECIPE, DOC)]
    requests += [rewrite_messages(RECIPE, DOC, f"genre {i}", f"audience {i}") for i in range(5)]
    requests.append(judge_messages(RECIPE, DOC, "a rewrite"))
    prefix = os.path.commonprefix([flat(r) for r in requests])
    assert DOC in prefix
    assert prefix.startswith("system:" + RECIPE.prompts["system"].format(n_pairs=5))
    assert all(document_from_messages(r) == DOC for r in requests)


def test_per_pair_part_comes_last():
    text = flat(rewrite_messages(RECIPE, DOC, "GENRE-X", "AUDIENCE-Y"))
    assert text.index(DOC) < text.index("GENRE-X") < text.index("AUDIENCE-Y")
    assert "propose 5 genre/audience pairs" in flat(pairs_messages(RECIPE, DOC)).split(DOC)[1]


def test_a_recipe_can_frame_the_document_its_own_way():
    import pytest

    from maga_tasks.recipe import RecipeError, recipe_from_dict

    data = RECIPE.model_dump(mode="json")
    data["prompts"]["document"] = "{document}\n\n"
    plain = recipe_from_dict(data)
    requests = [pairs_messages(plain, DOC)]
    requests += [rewrite_messages(plain, DOC, f"genre {i}", f"audience {i}") for i in range(5)]
    assert all(r[1]["content"].startswith(DOC + "\n\n") and "<<<" not in r[1]["content"] for r in requests)
    assert DOC in os.path.commonprefix([flat(r) for r in requests])  # still one cached prefix
    data["prompts"]["document"] = "SOURCE:\n"
    with pytest.raises(RecipeError, match="exactly once"):
        recipe_from_dict(data)


def test_the_judge_is_told_the_genre_it_asks_about_and_must_answer_it():
    task = judge_messages(RECIPE, DOC, "a rewrite", "GENRE-X", "AUDIENCE-Y")[-1]["content"].split(DOC)[1]
    assert RECIPE.judge_asks_genre and "GENRE-X" in task and task.index("GENRE-X") < task.index("a rewrite")
    schema = judge_json_schema(True)
    assert schema["required"] == ["analysis", "score", "genre_kept"] and list(schema["properties"])[-1] == "genre_kept"
    assert judge_json_schema(False) is JUDGE_JSON_SCHEMA and "genre_kept" not in JUDGE_JSON_SCHEMA["properties"]
