"""The dataset card's text from given totals: a header the hub parses, the recipe and the
figures as given, and untrusted values shown as text (the card written from a real
registry, on publish and on S3: tests/integration/test_card.py)."""

from __future__ import annotations

from maga_tasks.data.schema import ACCEPTED_SCHEMA
from maga_tasks.engine.card import render_card
from maga_tasks.recipe import CardFields, load_recipe
from tests.support.cards import CONFIGS, HOSTILE, assert_values_stay_text, figures_match, split_card

RECIPE = load_recipe()


def totals(**changes) -> dict:
    """Totals shaped as `Registry.totals` returns them."""
    return {
        "recipe_id": RECIPE.recipe_id, "shards": 3,
        "by_status": {"planned": 0, "leased": 0, "expanding": 0, "committed": 0, "validated": 0,
                      "registered": 2, "quarantined": 1, "failed": 0},
        "registered_shards": 2, "documents": 12, "accepted": 48_000, "rejected": 12, "requests": 70,
        "prompt_tokens": 12_345, "completion_tokens": 67_890, "source_chars": 3_000, "output_chars": 9_990,
        "seconds": 1.5, "expansion_ratio": 3.33, "accepted_per_document": 4.0,
        "invented_fact_rate": 0.125, "label_echo_rate": 0.0, "genre_kept_rate": None,
        "rejects_by_reason": {"low_keyword_coverage": 9, "refusal": 3},
        "genres": [("step-by-step tutorial", 20)], "audiences": [("high-school students", 20)],
    } | changes


def test_the_header_names_the_configs_license_and_size():
    header, body = split_card(render_card(RECIPE, totals()))
    assert header["configs"] == CONFIGS  # data/ first: the hub's default config
    assert header["license"] == "other" and "the recipe names none" in body
    assert header["task_categories"] == ["text-generation"] and header["language"] == ["en"]
    assert header["source_datasets"] == [] and header["size_categories"] == ["10K<n<100K"]
    figures_match(body, totals())


def test_the_card_says_what_made_the_corpus_and_lists_the_columns():
    recipe = RECIPE.model_copy(update={
        "model_revision": "3f1c2a9",
        "card": CardFields(license="odc-by", source_datasets=("HuggingFaceFW/fineweb-edu",), language=("en", "fr")),
    })
    header, body = split_card(render_card(recipe, totals()))
    assert header["license"] == "odc-by" and header["language"] == ["en", "fr"]
    assert header["source_datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert f"recipe id: `{recipe.recipe_id}`" in body and "model: `maga-default`, revision `3f1c2a9`" in body
    assert f"prompt version: `{recipe.prompt_version}`" in body
    assert f"pairs per document: {recipe.pairs_per_document}" in body
    assert "rewrite stage sampling: temperature 0.7, top_p 0.95, max_tokens 1536" in body
    for field in ACCEPTED_SCHEMA:
        assert f"| `{field.name}` | `{field.type}` |" in body
    assert "`reject_reason` and `reject_detail`" in body
    assert 'load_dataset("parquet", data_files={"train": f"{root}/data/*.parquet"}' in body
    assert "Shards not registered: quarantined 1." in body
    assert "             9  low_keyword_coverage" in body
    assert "| rewrites with an invented fact (invented-fact rate) | 12.5% |" in body
    assert "| rewrites echoing their pair's label (label-echo rate) | 0.0% |" in body
    assert "| accepted rows keeping their genre's form (genre-kept rate) | not measured |" in body


def test_hostile_values_neither_break_the_header_nor_become_markup():
    recipe = RECIPE.model_copy(update={
        "name": HOSTILE, "model": HOSTILE, "model_revision": HOSTILE, "prompt_version": HOSTILE,
        "card": CardFields(license=HOSTILE[:100], source_datasets=(HOSTILE,), language=(HOSTILE,)),
    })
    hostile = totals(rejects_by_reason={HOSTILE: 7, "refusal": 5}, genres=[(HOSTILE, 20)], audiences=[(HOSTILE, 1)])
    text = render_card(recipe, hostile)

    # The front matter ends where it should: a `---` value never opens a line.
    assert [line for line in text.splitlines() if line.strip() in ("---", "...")] == ["---", "---"]
    header, body = split_card(text)
    assert list(header) == ["pretty_name", "license", "language", "task_categories", "source_datasets",
                            "size_categories", "tags", "configs"]
    assert header["configs"] == CONFIGS
    assert "\n" not in header["license"] and "</script>" in header["license"]  # data, one line
    code = assert_values_stay_text(body, recipe.recipe_id)
    assert "</script><img src=x onerror=alert(1)>" in code  # shown as written, inside code
    assert "sekret1234" not in text and "\x1b" not in text and "\u2028" not in text  # redacted, no controls
    figures_match(body, hostile)


def test_a_backtick_run_in_a_value_gets_a_longer_fence():
    recipe = RECIPE.model_copy(update={"model": "a``b`"})
    assert "model: ``` a``b` ```, revision not pinned" in render_card(recipe, totals())
