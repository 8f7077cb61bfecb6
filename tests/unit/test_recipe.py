"""Recipe validation and the stability of recipe_id."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from maga_tasks.recipe import RecipeError, builtin_recipe_path, default_recipe_path, load_recipe


def write(tmp_path, data: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def default_data() -> dict:
    return yaml.safe_load(default_recipe_path().read_text())


def test_default_recipe_loads_with_five_pairs():
    recipe = load_recipe()
    assert recipe.pairs_per_document == 5
    assert recipe.recipe_id.startswith("r-") and len(recipe.recipe_id) == 14


def test_recipe_id_is_stable_and_follows_output_shaping_fields(tmp_path):
    base = load_recipe()
    assert load_recipe(write(tmp_path, default_data())).recipe_id == base.recipe_id
    changed = default_data()
    changed["rewrite"] = {"sampling": {"temperature": 0.3}}
    assert load_recipe(write(tmp_path, changed)).recipe_id != base.recipe_id
    assert load_recipe(model="other").recipe_id != base.recipe_id


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"endpoints": ["http://x"]}, "endpoints"),
        ({"pairs_per_document": 0}, "pairs_per_document"),
        ({"cleaning": {"min_keyword_coverage": 2}}, "cleaning.min_keyword_coverage"),
        ({"pairs": {"structured_output": "maybe"}}, "pairs.structured_output"),
        ({"rewrite": {"sampling": {"temperature": 9}}}, "rewrite.sampling.temperature"),
        ({"prompts": {"system": "x"}}, "prompts"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, patch, field):
    data = default_data()
    data.update(patch)
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, data))
    assert field in str(error.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(bad)


def test_recipe_id_names_the_weights_not_where_files_lie_nor_the_gate(tmp_path):
    base = load_recipe()
    # Where the tokenizer lies and the publish gate's thresholds do not shape the rows.
    assert load_recipe(tokenizer=str(tmp_path / "tokenizer")).recipe_id == base.recipe_id
    quality = default_data()
    quality["quality"] = {"min_accepted_per_document": 1.0, "max_text_chars": 9_999}
    assert load_recipe(write(tmp_path, quality)).recipe_id == base.recipe_id
    # Nor does what the dataset card says (engine/card.py).
    card = default_data()
    card["card"] = {"license": "odc-by", "source_datasets": ["HuggingFaceFW/fineweb-edu"], "language": ["en"]}
    assert load_recipe(write(tmp_path, card)).recipe_id == base.recipe_id
    # New weights behind the same served name are a new corpus version.
    first = load_recipe(model_revision="3f1c2a9")
    assert first.recipe_id != base.recipe_id
    assert load_recipe(model_revision="3f1c2a9").recipe_id == first.recipe_id
    assert load_recipe(model_revision="8d0e4b1").recipe_id != first.recipe_id


def test_an_option_left_unset_takes_no_part_in_the_id(tmp_path):
    base = load_recipe()
    unset = base.model_dump(mode="json")
    assert unset["rewrite"]["sampling"]["frequency_penalty"] is None and unset["pairs"]["catalogue"] is None
    assert load_recipe(write(tmp_path, unset)).recipe_id == base.recipe_id
    unset["rewrite"]["sampling"]["frequency_penalty"] = 0.5
    assert load_recipe(write(tmp_path, unset)).recipe_id != base.recipe_id
    # The id of a recipe that uses neither option is what it was before they existed.
    dumped = base.model_dump(mode="json", exclude={"tokenizer", "quality", "card"})
    del dumped["rewrite"]["sampling"]["frequency_penalty"], dumped["pairs"]["sampling"]["frequency_penalty"]
    del dumped["judge_sampling"]["frequency_penalty"], dumped["pairs"]["catalogue"], dumped["model_revision"]
    del dumped["rewrite"]["samples"]
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    assert base.recipe_id == "r-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


@pytest.mark.parametrize("name", ["default", "tiny", "smollm2-135m"])
def test_the_built_in_judges_ask_the_genre_question(name):
    assert load_recipe(builtin_recipe_path(name)).judge_asks_genre


def test_a_judge_task_without_the_genre_asks_no_genre_question(tmp_path):
    data = default_data()
    data["prompts"]["judge"] = data["prompts"]["judge"].replace("Genre: {genre}\n", "")
    recipe = load_recipe(write(tmp_path, data))
    assert "{genre}" not in recipe.prompts["judge"] and not recipe.judge_asks_genre
