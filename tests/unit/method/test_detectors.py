"""The detectors and the cleaning on real answers of SmolLM2-135M-Instruct.

tests/fixtures/smollm2_outputs.jsonl holds answers collected from the real model (served
by vLLM CPU) on real Wikipedia summaries, each labelled by hand: good rewrites, echoes
of the prompt, loops, refusals, talk about the task, other languages, near copies,
drift, truncation, and
genre/audience pairs that are or are not descriptions.
"""

from __future__ import annotations

import json
import re._constants as re_constants  # the parser's tree: where a pattern's match can start
import re._parser as re_parser

import pytest

from maga_tasks.method import detectors
from maga_tasks.method.cleaning import clean_rewrite, strip_boilerplate
from maga_tasks.method.stages import validate_pairs
from maga_tasks.recipe import builtin_recipe_path, load_recipe
from tests.support.paths import FIXTURES_DIR

FIXTURE = FIXTURES_DIR / "smollm2_outputs.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
REWRITES = [r for r in ROWS if r["kind"] == "rewrite"]
PAIRS = [r for r in ROWS if r["kind"] == "pairs"]
RECIPE = load_recipe(builtin_recipe_path("smollm2-135m"))


def _id(row: dict) -> str:
    return f"{row['label']}:{row['output'][:30]!r}"


def test_the_fixture_holds_every_failure_mode_it_claims():
    labels = {r["label"] for r in REWRITES}
    assert {
        "good", "prompt_echo", "repetition", "refusal", "task_talk", "other_language", "near_copy", "drift"
    } <= labels
    assert {"junk_pair", "good_pair"} <= {r["label"] for r in PAIRS}


@pytest.mark.parametrize("row", [r for r in REWRITES if r["label"] == "good"], ids=_id)
def test_good_real_rewrites_are_accepted(row):
    verdict = clean_rewrite(
        row["source"], row["output"], row["finish_reason"], RECIPE.cleaning, row["genre"], row["audience"]
    )
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
    assert sum(found) >= 0.75 * len(rows), list(zip(found, (r["output"][:60] for r in rows), strict=True))


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
    assert (
        detectors.task_talk("Editors rewrite drafts many times.", "Editors often rewrite drafts before print.") is None
    )
    assert detectors.task_talk("Ladies and gentlemen, here is a radio script read aloud:", "A radio station.")


# -- the quick looks that keep cleaning cheap --------------------------------------------

# One phrase or line per alternative of the echo, refusal and task-talk patterns.
PLANTED = [
    "Rewrite the document above", "for this genre and audience", "For this reader,", "the text above",
    "propose 5 genre/audience pairs", "the information points of the document", "Output only the final text",
    "no preamble, notes or remarks", "with no notes", "reworked for a new reader", "can be reformatted as follows",
    "a rewritten version of the text", "As an AI, I", "as a large language model", "I'm sorry", "I cannot help",
    "I don't have access", "Please provide the text", "Could you please clarify", "I'd be happy to help",
    "I'm ready to help", "Would you like me to", "What genre would you like?", "Is there a line missing?",
    "please provide feedback", "It was rewritten.", "rephrased", "paraphrasing", "the original text",
    "my previous response", "Here's an edited version", "here is a radio script",
    "<|im_start|>assistant", "[INST] hi [/INST]", "<<SYS>>", "\nassistant\n", "\nTASK: do it\n", "\nTask - do it\n",
    "\n<<<\n", " the end >>>\n", "\nGenre: a report\n", "\n**Audience**: pupils\n", "\nSource document: x\n",
    "\nLanguage: English\n",
]


def _full_scan_findings(text: str, source: str, genre: str, audience: str) -> list:
    """What the detectors find when every pattern searches the whole text, no quick look first."""
    low = text.lower()
    echo = next((f"{what}" for p, what, in_low in detectors._MARKUP if p.search(low if in_low else text)), None)
    if echo is None and detectors._INSTRUCTION_ECHO.search(low):
        echo = "the instructions"
    talk = next((p.pattern for p in detectors._TASK_TALK if p.search(low) and not p.search(source.lower())), None)
    return [echo, bool(detectors._REFUSAL.search(low)), talk]


_WHATS = [what for _, what, _ in detectors._MARKUP] + ["the instructions"]


def _quick_findings(text: str, source: str, genre: str, audience: str) -> list:
    echo = detectors.prompt_echo(text, "", "")
    talk = detectors.task_talk(text, source)
    return [
        echo and next(what for what in _WHATS if echo[1].startswith(f"{what}: ")),
        bool(detectors.refusal(text)),
        next((p.pattern for p in detectors._TASK_TALK if talk and p.search(text.lower())), None),
    ]


def test_the_quick_looks_never_hide_what_the_full_scans_find():
    # prompt_echo, refusal and task_talk skip the scans that cannot match (one scan for
    # every phrase, one for the line labels, a bracket test): on real outputs, and on
    # every alternative planted into real text in three casings, they find what a search
    # of every pattern over the whole text finds.
    from maga_tasks.data.sample_corpus import wikipedia_summaries

    texts = [(r["output"], r["source"]) for r in REWRITES] + [(a["text"], "") for a in wikipedia_summaries()[:40]]
    planted = 0
    for i, (base, source) in enumerate(texts[:60]):
        words = base.split(" ")
        for j, phrase in enumerate(PLANTED):
            for variant in (phrase, phrase.upper(), phrase.title()):
                at = (i * 7 + j * 3) % (len(words) + 1)
                text = " ".join(words[:at] + [variant] + words[at:])
                full = _full_scan_findings(text, source, "", "")
                assert _quick_findings(text, source, "", "") == full, (variant, text[:200])
                planted += variant == phrase and any(full)
    for base, source in texts:
        assert _quick_findings(base, source, "", "") == _full_scan_findings(base, source, "", "")
    assert planted >= 0.95 * 60 * len(PLANTED)  # the planted phrases are findings at all


def test_another_language_is_caught_though_language_id_runs_only_where_few_words_are_shared():
    # Language ID (most of cleaning's CPU) runs only when under half of the rewrite's
    # words occur in its source. Against summaries of the same article in French and
    # Spanish, which share names, dates and titles with the English one, it still
    # catches what language ID on every text catches, but for a few texts made mostly of
    # names.
    from maga_tasks.data.sample_corpus import wikipedia_summaries

    english = {a["title"]: a["text"] for a in wikipedia_summaries(min_chars=40)}
    pairs = [
        pair
        for language in ("fr-fr", "es-es")
        for article in wikipedia_summaries(min_chars=40, language=language)[::3]
        if article["title"] in english
        for pair in ((article["text"], english[article["title"]]), (english[article["title"]], article["text"]))
    ]

    def language_id_on_every_text(text, source):
        got, confidence = detectors.language_of(text)
        return got != detectors.language_of(source)[0] and confidence >= 0.8

    caught = [bool(detectors.other_language(text, source)) for text, source in pairs]
    always = [bool(detectors.other_language(text, source)) or language_id_on_every_text(text, source)
              for text, source in pairs]
    missed = sum(a and not c for a, c in zip(always, caught, strict=True))
    print(f"\n{len(pairs)} cross-language pairs: caught {sum(caught)}, with language ID on every text "
          f"{sum(always)}, missed for sharing words {missed}")
    assert len(pairs) > 2000
    assert sum(caught) >= 0.95 * len(pairs)
    assert missed <= 0.002 * len(pairs)


def _first_chars(items: list) -> set[str] | None:
    """The characters a parsed pattern's match can start with; None where it cannot tell
    (anything but literals, sets of literals, groups and alternatives)."""
    if not items:
        return None  # an empty alternative matches anywhere
    op, arg = items[0]
    if op is re_constants.LITERAL:
        return {chr(arg)}
    if op is re_constants.IN and all(kind is re_constants.LITERAL for kind, _ in arg):
        return {chr(code) for _, code in arg}
    if op is re_constants.SUBPATTERN:
        return _first_chars(arg[3].data)
    if op is re_constants.BRANCH:
        found = [_first_chars(branch.data) for branch in arg[1]]
        return None if None in found else set().union(*found)
    return None


@pytest.mark.parametrize("pattern, starts", [
    (r"(?:ab|c)d", {"a", "c"}), (r"[xy]z", {"x", "y"}), (r"(a|b)", {"a", "b"}),
    (r"a?b", None), (r"\w+", None), (r"(?:x|)y", None),
])
def test_the_start_letters_are_read_off_a_pattern_only_where_it_can_tell(pattern, starts):
    assert _first_chars(re_parser.parse(pattern).data) == starts


def test_the_phrase_scan_looks_ahead_for_exactly_the_letters_the_phrases_start_with():
    starts = [_first_chars(re_parser.parse(p.pattern[2:]).data) for p in detectors._PHRASE_PATTERNS]
    assert None not in starts
    assert set(detectors.PHRASE_STARTS) == set().union(*starts)
