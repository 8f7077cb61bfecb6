"""The detectors and the cleaning on real answers of SmolLM2-135M-Instruct.

tests/fixtures/smollm2_outputs.jsonl holds answers collected from the real model (served
by vLLM CPU) on real Wikipedia summaries, each labelled by hand: good rewrites, echoes
of the prompt, loops, refusals, talk about the task, other languages, near copies,
drift, truncation, echoes of the pair's own labels, invented facts, ignored genres, and
genre/audience pairs that are or are not descriptions. Each row carries a `split`
(`tune`, `held_out`, by document, fixed before labelling): thresholds are tuned on `tune`.
`fresh` is a later batch of new documents, labelled blind after every check here was
fixed: what the cleaning does on answers nobody tuned it on.
"""

from __future__ import annotations

import json
import re._constants as re_constants  # the parser's tree: where a pattern's match can start
import re._parser as re_parser

import pytest

from maga_tasks.method import detectors, fidelity
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
        "good", "prompt_echo", "repetition", "refusal", "task_talk", "other_language", "near_copy", "drift",
        "pair_label_echo", "invented_facts", "off_genre", "too_short",
    } <= labels
    assert {"junk_pair", "good_pair"} <= {r["label"] for r in PAIRS}
    assert len(ROWS) >= 480 and {r["split"] for r in ROWS} == {"tune", "held_out", "fresh"}
    # The split is by document, fixed before labelling: a source's rows share their split.
    by_source = {}
    for row in ROWS:
        assert by_source.setdefault(row["source"], row["split"]) == row["split"]


def _verdict(row: dict):
    return clean_rewrite(row["source"], row["output"], row["finish_reason"] or "stop", RECIPE.cleaning,
                         row["genre"], row["audience"])


@pytest.mark.parametrize("row", [r for r in REWRITES if r["label"] == "good" and r["split"] == "tune"], ids=_id)
def test_good_real_rewrites_are_accepted(row):
    verdict = _verdict(row)
    assert verdict.reject_reason is None, verdict
    text = strip_boilerplate(row["output"])[0]
    assert detectors.rewrite_findings(text, row["source"], row["genre"], row["audience"]) == []


# Kinds the cleaning is built to reject whole: every such row, in both splits.
WHOLLY_REJECTED = ("prompt_echo", "refusal", "repetition", "other_language", "too_short", "truncated")


@pytest.mark.parametrize("row", [r for r in REWRITES if r["label"] in WHOLLY_REJECTED], ids=_id)
def test_every_real_junk_rewrite_of_a_rejected_kind_is_rejected(row):
    assert _verdict(row).reject_reason is not None, row["note"]


# The accepted rows of each kind, tune / held-out / fresh, as measured on 2026-12-07 with
# the letter cue enforced, task talk in forms without a rewording word, and talk about the
# reader in fewer than five words in a row (good: of 17 / 8 / 3). A fact changed in words,
# a genre ignored, drift that keeps the keywords: the word checks cannot see them
# (docs/real-model.md); these ceilings keep what they do see. The held-out column was
# read (counts only) after the tune split had decided each check; the fresh one once,
# after its blind labels (13 invented facts accepted), then again after the fix of a
# bug found in reading it (a number against its unit, "223Rn", was not a number).
SPLITS = ("tune", "held_out", "fresh")
ACCEPTED_AT_MOST = {
    "invented_facts": (15, 7, 12),
    "pair_label_echo": (2, 3, 1),
    "task_talk": (0, 3, 0),
    "off_genre": (4, 2, 1),
    "drift": (0, 1, 2),
    "near_copy": (2, 0, 1),
}


def confusion() -> dict[tuple[str, str], list[int]]:
    """(label, split) -> [rows, accepted] over the fixture's rewrites."""
    table: dict[tuple[str, str], list[int]] = {}
    for row in REWRITES:
        cell = table.setdefault((row["label"], row["split"]), [0, 0])
        cell[0] += 1
        cell[1] += _verdict(row).reject_reason is None
    return table


def test_the_confusion_matrix_on_real_answers():
    table = confusion()
    print("\nlabel, split: rows, accepted")
    for (label, split), (rows, accepted) in sorted(table.items()):
        print(f"  {label:16s} {split:8s} {rows:3d} {accepted:3d}")
    assert table[("good", "tune")] == [17, 17]
    assert table[("good", "held_out")][1] >= 6  # 2 close calls lost to the length and coverage rules
    assert table[("good", "fresh")] == [3, 3]
    for label, ceilings in ACCEPTED_AT_MOST.items():
        for split, ceiling in zip(SPLITS, ceilings, strict=True):
            assert table[(label, split)][1] <= ceiling, (label, split, table[(label, split)])
    # Junk rejected: 111 of 127 held out, 60 of 77 fresh (mostly facts changed in words pass).
    for split, floor in (("held_out", 0.85), ("fresh", 0.75)):
        junk = [cell for (label, where), cell in table.items() if label != "good" and where == split]
        rejected = sum(rows - accepted for rows, accepted in junk) / sum(rows for rows, _ in junk)
        assert rejected >= floor, (split, rejected)


@pytest.mark.parametrize(
    "label, detector",
    [
        ("repetition", lambda text, row: detectors.repetition(text)),
        ("other_language", lambda text, row: detectors.other_language(text, row["source"])),
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
    # must still see most of them. (Refusals are now mostly asking back in a sentence the
    # length checks reject first: 5 of 10 found by the detector, every one rejected.)
    assert sum(found) >= 0.65 * len(rows), list(zip(found, (r["output"][:60] for r in rows), strict=True))


def test_the_fidelity_checks_on_real_answers():
    """label_echo and invented_facts on the rows labelled with what they look for (tune
    split: 14 of 18 echoes, 25 of 48 invented facts found by words alone) and on none
    of the good ones."""
    tune = [r for r in REWRITES if r["split"] == "tune"]

    def found(row, check) -> bool:
        return bool(check(strip_boilerplate(row["output"])[0], row))

    echo = lambda text, row: fidelity.label_echo(text, row["source"], row["genre"], row["audience"])  # noqa: E731
    facts = lambda text, row: fidelity.invented_facts_finding(  # noqa: E731
        text, row["source"], row["genre"], row["audience"],
        RECIPE.cleaning.max_invented_numbers, RECIPE.cleaning.max_invented_names,
    )
    assert sum(found(r, echo) for r in tune if r["label"] == "pair_label_echo") >= 14
    assert sum(found(r, facts) for r in tune if r["label"] == "invented_facts") >= 25
    assert not [r["output"][:60] for r in tune if r["label"] == "good" and (found(r, echo) or found(r, facts))]


def test_label_echo_keeps_a_genre_named_as_a_heading_and_a_natural_address():
    genre, audience = "a letter to a friend that explains why the topic matters", "young children aged seven to ten"
    source = "Rivers carry water from the hills to the sea."
    assert fidelity.label_echo("Dear friend, rivers carry water to the sea.", source, genre, audience) is None
    assert fidelity.label_echo(
        "A question-and-answer sheet.\nQ: Where do rivers go? A: To the sea.", source,
        "a question-and-answer sheet with short questions and clear answers", audience,
    ) is None
    assert fidelity.label_echo("Young children aged seven to ten love rivers.", source, genre, audience)
    # Words the source itself holds are the topic, not an echo.
    assert fidelity.label_echo("Children aged seven to ten swim.", "Children aged seven to ten swim here.",
                               genre, audience) is None


def test_label_echo_sees_a_text_that_talks_about_its_reader_in_fewer_words():
    source = "A crystal is a solid whose atoms are arranged in a lattice."
    tourists = "tourists planning a visit to the region"
    found = fidelity.label_echo("Tourists planning a trip to the region focus on crystals.", source, "a summary",
                                tourists)
    assert found and found[1] == "the text talks about its reader: 'tourists, planning, region'"
    # Across sentences too: the reader named, and what they do.
    assert fidelity.reader_named("Teachers are tasked with it. When preparing, use crystals.", source,
                                 "teachers preparing material for a class") == ("teachers", "preparing")
    # One word is an address, not talk about the reader.
    assert fidelity.label_echo("Dear tourists, a crystal is a solid lattice.", source, "a letter", tourists) is None
    # Words the source holds are its topic; words past the reader's own name need it too.
    assert fidelity.reader_named("Tourists love the region.", "Tourists visit the region.", tourists) == ()
    assert fidelity.reader_named("A region to visit: a solid lattice.", source, tourists) == ()


def test_a_question_and_answer_sheet_must_answer_questions():
    genre = "a question-and-answer sheet with short questions and clear answers"
    assert fidelity.off_genre("What is a river? Water that flows to the sea. Why? Rain.", genre) is None
    assert fidelity.off_genre("Rivers carry water to the sea.", genre)  # no question
    assert fidelity.off_genre("Rivers flow. What is a river? Where does it go?", genre)  # unanswered
    # Other genres' cues are measured, not enforced.
    radio = "a radio script read aloud by a presenter"
    assert fidelity.off_genre("Rivers carry water.", radio) is None
    assert fidelity.genre_kept("Rivers carry water.", radio) is False
    letter = "a letter to a friend that explains why the topic matters"
    assert fidelity.genre_kept("Rivers carry water.", letter) is False
    assert fidelity.genre_kept("Dear Sam,\nrivers carry water.\nLove,\nAna", "a letter to a friend") is True
    assert fidelity.genre_kept("Rivers carry water.", "a short news report for a general newspaper") is None
    # A newsletter is no letter; letters are.
    assert fidelity.genre_kept("Rivers carry water.", "A newsletter feature for a general magazine") is None
    assert fidelity.genre_kept("Rivers carry water.", "Letters between two friends") is False


def test_a_letter_must_greet_or_sign_off():
    letter = "a letter to a friend that explains why the topic matters"
    # Encyclopedia sentences with no one addressed are no letter (the real rows it rejects).
    assert fidelity.off_genre("Crux is a constellation of the southern sky.", letter)
    assert fidelity.off_genre("Hello is a word people say. Rivers carry water.", letter) is None  # a "Hello" line
    for kept in ("Dear Sam,\nrivers carry water.", "My dear friend,\nrivers carry water.",
                 "Cheri,\n\nRivers carry water.", "Aunt May,\nRivers carry water.",
                 "Rivers carry water.\nTake care,\nAna", "Rivers carry water.\n(Signed) Cheri"):
        assert fidelity.off_genre(kept, letter) is None, kept
    # Near misses: a first line that is a sentence, a lower-case word or a connective with
    # more after it, and a "Warm" sentence, are neither greeting nor sign-off.
    for missed in ("Rivers carry water,\nand the sea.", "however,\nrivers carry water.",
                   "However, rivers carry water.", "Rivers flow.\nWarm days follow in May."):
        assert fidelity.off_genre(missed, letter), missed


def test_invented_facts_normalise_numbers_and_ignore_the_sources_own():
    source = "The bridge opened in 1932 after three years of work; it is 1,149 metres long."
    numbers, names = fidelity.invented_facts("Opened in 1932 after 3 years, the 1149-metre bridge.", source)
    assert (numbers, names) == ((), ())
    numbers, names = fidelity.invented_facts("It opened on 4 May 1933 in Sydney, Australia.", source)
    assert numbers == ("1933", "4") and names == ("May", "Sydney", "Australia")  # a month is a date
    assert fidelity.invented_fact_count("A radio script: Hello, Radio listeners.", source, "a radio script") == 0
    # A number written against its unit or symbol is a number (a fresh real row: radon's
    # "223Rn (the heaviest)" where the source has only 222Rn); one inside a word is not.
    numbers, _ = fidelity.invented_facts("Of 222Rn and 223Rn, a 5km walk, 1990s, 2nd, COVID19 and x86.",
                                         "Only 222Rn lasts; in the 1990s, the 2nd.")
    assert numbers == ("223", "5")


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


SOURCE = "Lizards are reptiles found on every continent except Antarctica."


@pytest.mark.parametrize("caught, near_miss", [
    # the writer on its own revisions or draft
    ("Lizards live everywhere.\n\nI made additional revisions to enhance clarity.",
     "I made a nest for the lizards in the garden."),
    ("Lizards live everywhere. I've made a few small changes to the wording.",
     "Lizards have made big changes to their habitats."),
    ("The story I'm writing about lizards is for children.", "The story of lizards is for children."),
    # the requester's piece, or the writer's own by a name for a draft
    ("Your piece has already provided a fine explanation; I'll just need to add more.",
     "Your pet lizard needs a warm piece of rock."),
    ("Lizards live everywhere. Let me know what you think of my version.", "My lizard is called Rex."),
    # the text described instead of written
    ("This article includes a brief overview of lizard species.", "This lizard includes insects in its diet."),
    ("Lizards live everywhere. The article also provides details about the Komodo dragon.",
     "The Komodo dragon provides a home for many parasites."),
    ("In this article, you will find more information on lizards.", "In this desert, you will find lizards."),
    # the genre as an assignment
    ("The news report would be written by a general newspaper in English.",
     "The report was written by a zoologist in 1820."),
    ("This summary is written for busy adults.", "This lizard is adapted to dry land."),
])
def test_task_talk_in_forms_without_a_rewording_word(caught, near_miss):
    assert detectors.task_talk(caught, SOURCE), caught
    assert detectors.task_talk(near_miss, SOURCE) is None, near_miss
    # judged against the source: a source that itself talks so lets its rewrites do it
    assert detectors.task_talk(caught, caught) is None


def test_task_talk_leaves_a_letter_and_a_lesson_plan_their_own_words():
    assert detectors.task_talk("Dear Sam, I am writing this letter to tell you about lizards.", SOURCE) is None
    assert detectors.task_talk("This lesson plan is designed for one class period.", SOURCE) is None
    assert detectors.task_talk("Good luck with your essay on lizards!", SOURCE) is None
    # a source that describes itself as an article lets its rewrites describe the article
    hatnote = "This article covers the lizards of Europe. Lizards are reptiles."
    assert detectors.task_talk("This article covers the lizards of Europe.", hatnote) is None
    assert detectors.task_talk("This article covers the lizards of Europe. I made some edits.", hatnote)


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
    "I made several changes", "the story I'm writing", "your piece", "this article includes", "in this summary",
    "the report would be written by",
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
