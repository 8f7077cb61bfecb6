"""Boilerplate stripping and the rewrite checks."""

from __future__ import annotations

from maga_tasks.method.cleaning import clean_rewrite, copy_ratio, keyword_coverage, strip_boilerplate
from maga_tasks.recipe import Cleaning

SOURCE = (
    "Photosynthesis converts light energy into chemical energy in plants. Chlorophyll absorbs light, "
    "and the chloroplast uses carbon dioxide and water to produce glucose and oxygen."
)
REWRITE = (
    "Imagine a leaf as a tiny kitchen. Its chlorophyll catches light energy, and inside each chloroplast "
    "the plant mixes carbon dioxide with water. Out come glucose, the plant's food, and oxygen for us: "
    "that is photosynthesis turning light into chemical energy."
)


def test_strips_openers_and_closers():
    wrapped = f"Sure! Here is the rewritten text:\n\n{REWRITE}\n\nNote: I kept every fact.\n\nI hope this helps!"
    text, removed = strip_boilerplate(wrapped)
    assert text == REWRITE and removed >= 3
    text, removed = strip_boilerplate(f"The following is a version for children.\n{REWRITE}")
    assert text == REWRITE and removed == 1
    assert strip_boilerplate("```markdown\n" + REWRITE + "\n```")[0] == REWRITE
    assert strip_boilerplate(REWRITE) == (REWRITE, 0)


def test_keyword_coverage_and_copy_ratio():
    assert keyword_coverage(SOURCE, REWRITE) >= 0.6
    assert keyword_coverage(SOURCE, "Completely unrelated words about football.") == 0
    assert copy_ratio(SOURCE, SOURCE) == 1.0
    assert copy_ratio(SOURCE, REWRITE) < 0.2


def test_verdicts():
    rules = Cleaning()
    assert clean_rewrite(SOURCE, REWRITE, "stop", rules).reject_reason is None
    assert clean_rewrite(SOURCE, REWRITE, "length", rules).reject_reason == "truncated"
    assert clean_rewrite(SOURCE, "   ", "stop", rules).reject_reason == "empty"
    assert clean_rewrite(SOURCE, "Too short.", "stop", rules).reject_reason == "too_short"
    assert clean_rewrite(SOURCE, REWRITE * 20, "stop", rules).reject_reason == "too_long_for_source"
    assert clean_rewrite(SOURCE, SOURCE, "stop", rules).reject_reason == "near_copy"
    off = "Football is a game played by two teams of eleven players on a rectangular field with goals."
    assert clean_rewrite(SOURCE, off * 2, "stop", rules).reject_reason == "low_keyword_coverage"
