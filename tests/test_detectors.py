"""The detectors and the cleaning on real answers of SmolLM2-135M-Instruct.

tests/fixtures/smollm2_outputs.jsonl holds answers collected from the real model (served
by vLLM CPU) on real Wikipedia summaries, each labelled by hand: good rewrites, echoes
of the prompt, loops, refusals, talk about the task, other languages, near copies,
drift, truncation, and
genre/audience pairs that are or are not descriptions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maga_tasks.method import detectors
from maga_tasks.method.cleaning import clean_rewrite, strip_boilerplate
from maga_tasks.method.stages import validate_pairs
from maga_tasks.recipe import builtin_recipe_path, load_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_outputs.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
REWRITES = [r for r in ROWS if r["kind"] == "rewrite"]
PAIRS = [r for r in ROWS if r["kind"] == "pairs"]
RECIPE = load_recipe(builtin_recipe_path("smollm2-135m"))


def _id(row: dict) -> str:
    return f"{row['label']}:{row['output'][:30]!r}"


def test_the_fixture_holds_every_failure_mode_it_claims():
    labels = {r["label"] for r in REWRITES}
    assert {"good", "prompt_echo", "repetition", "refusal", "task_talk", "other_language", "near_copy", "drift"} <= labels
    assert {"junk_pair", "good_pair"} <= {r["label"] for r in PAIRS}


@pytest.mark.parametrize("row", [r for r in REWRITES if r["label"] == "good"], ids=_id)
def test_good_real_rewrites_are_accepted(row):
    verdict = clean_rewrite(row["source"], row["output"], row["finish_reason"], RECIPE.cleaning, row["genre"], row["audience"])
    assert verdict.reject_reason is None, verdict
    text = strip_boilerplate(row["output"])[0]
    assert detectors.rewrite_findings(text, row["source"], row["genre"], row["audience"]) == []


@pytest.mark.parametrize("row", [r for r in REWRITES if r["label"] != "good"], ids=_id)
def test_every_real_junk_rewrite_is_rejected(row):
    verdict = clean_rewrite(row["source"], row["output"], row["finish_reason"] or "stop", RECIPE.cleaning,
                            row["genre"], row["audience"])
    assert verdict.reject_reason is not None, row["note"]


@pytest.mark.parametrize(
    "label, detector",
    [
        ("repetition", lambda text, row: detectors.repetition(text)),
        ("other_language", lambda text, row: detectors.other_language(text, row["source"])),
        ("refusal", lambda text, row: detectors.refusal(text)),
        ("task_talk", lambda text, row: detectors.task_talk(text, row["source"])),
        # The echoes it misses are a bare restatement of the genre, one short line, which
        # the length checks reject (the junk test above).
        ("prompt_echo", lambda text, row: detectors.prompt_echo(text, row["genre"], row["audience"])),
    ],
)
def test_each_detector_names_its_own_real_failures(label, detector):
    rows = [r for r in REWRITES if r["label"] == label]
    found = [bool(detector(strip_boilerplate(r["output"])[0], r)) for r in rows]
    # Loops the sampler cut at max_tokens are rejected as truncated first; the detector
    # must still see most of them.
    assert sum(found) >= 0.75 * len(rows), list(zip(found, (r["output"][:60] for r in rows)))


def test_echo_patterns_on_our_own_prompt_lines():
    assert detectors.prompt_echo("TASK: rewrite the document above for this genre and audience.")
    assert detectors.prompt_echo("Some text.\n<<<\nThe source.\n>>>")
    assert detectors.prompt_echo("<|im_start|>assistant\nHello")
    assert detectors.prompt_echo("Genre: a report\nAudience: pupils\nThe text.")
    assert detectors.prompt_echo("A fine text.", genre="x") is None


@pytest.mark.parametrize("row", [r for r in PAIRS if r["label"] == "junk_pair"], ids=_id)
def test_real_junk_pairs_are_refused(row):
    answer = {"pairs": [{"genre": row["genre"], "audience": row["audience"]}] * 1}
    recipe = RECIPE.model_copy(update={"pairs_per_document": 1})
    pairs, reason, _ = validate_pairs(answer, recipe)
    assert pairs is None, (row["genre"], row["audience"])


@pytest.mark.parametrize("row", [r for r in PAIRS if r["label"] == "good_pair"], ids=_id)
def test_real_descriptive_pairs_pass(row):
    recipe = RECIPE.model_copy(update={"pairs_per_document": 1})
    pairs, reason, detail = validate_pairs({"pairs": [{"genre": row["genre"], "audience": row["audience"]}]}, recipe)
    assert pairs, (reason, detail)


def test_task_talk_is_judged_against_the_source():
    # A source about rewriting may use the word; a rewrite of a source that does not, may not.
    assert detectors.task_talk("Rewritten text: The river floods in spring.", "The river floods in spring.")
    assert detectors.task_talk("Editors rewrite drafts many times.", "Editors often rewrite drafts before print.") is None
    assert detectors.task_talk("Ladies and gentlemen, here is a radio script read aloud:", "A radio station.")
