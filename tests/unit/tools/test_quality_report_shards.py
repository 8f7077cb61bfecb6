"""The quality report's per-shard table: each shard's yield and collapse band beside the
fidelity rates the pipeline computed for it, and a row over all shards weighted by rows."""

from __future__ import annotations

from maga_tasks.data.figures import FigureTally
from maga_tasks.method.cleaning import echo_judged_by
from maga_tasks.recipe import builtin_recipe_path, load_recipe
from maga_tasks.tools.quality_report import markdown, measure, shard_row

RECIPE = load_recipe(builtin_recipe_path("smollm2-135m"))
SOURCE = (
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait in California."
    " It opened in 1937 and was the longest suspension bridge in the world at the time."
)
QA = "a question-and-answer sheet with short questions and clear answers"
NEWS = "a short news report for a general newspaper"
AUDIENCE = "tourists planning a visit to the region"


def row(doc: str, pair: int, genre: str, text: str | None, facts: int | None, reason: str | None = None) -> dict:
    return {"source_id": doc, "pair_index": pair, "genre": genre, "audience": AUDIENCE, "text": text,
            "invented_fact_count": facts, "reject_reason": reason}


def shard(name: str, accepted: list[dict], rejected: list[dict]) -> dict:
    """A shard's table row as `run_quality` makes it: measured rows, figures tallied."""
    tally = FigureTally(echo_judged_by(RECIPE.cleaning))
    for item in accepted:
        tally.add(item, rejected=False)
    for item in rejected:
        tally.add(item, rejected=True)
    sources = {item["source_id"]: SOURCE for item in accepted + rejected}
    return shard_row(name, measure(accepted, rejected, sources, RECIPE), tally.figures())


ANSWERED = "What is the Golden Gate Bridge? A suspension bridge in California. When did it open? In 1937."
ONE = shard(
    "part-0000",
    [row("a", 0, QA, ANSWERED, 0),
     row("a", 1, NEWS, "The Golden Gate Bridge, a suspension bridge in California, opened in 1937 in Marin.", 1)],
    [row("a", 2, NEWS, "Tourists planning a visit to the region will love the bridge.", 0, "pair_label_echo"),
     row("a", 3, NEWS, "The bridge opened", 0, "truncated")],
)
TWO = shard(
    "part-0001",
    [row("b", 0, NEWS, "The Golden Gate Bridge opened in 1937 in California as a suspension bridge.", 0)],
    [row("b", 1, QA, "The Golden Gate Bridge is a bridge in California, opened in 1937.", 0, "off_genre")],
)


def test_a_shard_row_holds_its_yield_band_and_rates():
    assert ONE["documents"] == 1 and ONE["accepted"] == 2 and ONE["yield"] == 0.4  # 2 of 1 x 5 pairs
    assert ONE["rewrites_with_text"] == 4 and ONE["drifted"] == 1  # the truncated stub keeps few keywords
    # 1 of 4 counted rows invents; the echo check judged the 2 accepted and its own reject
    # (not the truncated row); the sheet answers its questions, the news report has no cue.
    assert (ONE["invented_fact_rate"], ONE["label_echo_rate"], ONE["genre_kept_rate"]) == (0.25, 0.3333, 1.0)
    assert (TWO["invented_fact_rate"], TWO["label_echo_rate"], TWO["genre_kept_rate"]) == (0.0, 0.0, None)


def test_the_report_shows_a_row_per_shard_and_one_over_all_weighted_by_rows():
    figures = measure([], [], {}, RECIPE) | {"shards": [ONE, TWO]}
    text = markdown(figures)
    assert "| part-0000 | 1 | 2 | 40.0% | 0 / 1 / 4 | 25.0% | 33.3% | 100.0% |" in text
    assert "| part-0001 | 1 | 1 | 20.0% | 0 / 0 / 2 | 0.0% | 0.0% | - |" in text
    # 1 of 6 invents, 1 of 5 judged echoes, 1 of 1 sheet kept: not the means of the shards.
    assert "| all | 2 | 3 | | 0 / 1 / 6 | 16.7% | 20.0% | 100.0% |" in text
