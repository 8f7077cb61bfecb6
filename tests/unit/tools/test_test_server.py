"""The deterministic test LLM server's parts that need no process: its fault specs and the
pairs it makes for any count (the server itself, run as real processes on loopback:
tests/integration/test_test_server.py)."""

from __future__ import annotations

import re

import pytest

from maga_tasks.recipe import default_recipe_path, load_recipe
from maga_tasks.tools.test_server import make_pairs, parse_fault, profile_document
from tests.support.texts import PRESS

# Read by path: the package may be imported through an editable-install finder.
RECIPE = load_recipe(default_recipe_path())


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("http500", {"kind": "http500", "rate": 1.0, "times": 1}),
        ("http429:0.25:3", {"kind": "http429", "rate": 0.25, "times": 3}),
        ("timeout:0.1:1:hang=5", {"kind": "timeout", "rate": 0.1, "times": 1, "hang_s": 5.0}),
        ("timeout:hang=0.5", {"kind": "timeout", "rate": 1.0, "hang_s": 0.5}),
        (
            "bad_json",
            {
                "kind": "bad_json",
                "rate": 1.0,
                "times": float("inf"),
                "stages": frozenset({"pairs"}),
            },
        ),
        (
            "truncate:rate=0.5:stage=rewrite+judge",
            {"rate": 0.5, "stages": frozenset({"rewrite", "judge"})},
        ),
        ("off_topic:0.3:2", {"kind": "off_topic", "rate": 0.3, "times": 2}),
        ("disconnect:1:inf", {"times": float("inf")}),
        ("die_after:3", {"kind": "die_after", "after": 3}),
    ],
)
def test_parse_fault_accepts(spec, expected):
    fault = parse_fault(spec)
    for name, value in expected.items():
        assert getattr(fault, name) == value, name


@pytest.mark.parametrize(
    "spec, says",
    [
        ("explode", "unknown kind"),
        ("http500:1.5", "RATE"),
        ("http500:x", "RATE"),
        ("http500:1:0", "TIMES"),
        ("http500:1:1:1", "too many"),
        ("http500:hang=3", "unknown option 'hang'"),
        ("timeout:hang=-1", "hang"),
        ("wrong_count:stage=rewrite", "stage"),
        ("die_after", "die_after:N"),
        ("die_after:0.5", "die_after:N"),
    ],
)
def test_parse_fault_rejects(spec, says):
    with pytest.raises(ValueError, match=re.escape(says)) as caught:
        parse_fault(spec)
    assert "\n" not in str(caught.value) and spec in str(caught.value)


def test_pairs_fit_the_recipe_bounds_for_any_count():
    profile = profile_document("Supercalifragilisticexpialidocious" * 3 + " words. " + PRESS)
    low_g, high_g = RECIPE.pairs.genre_chars
    low_a, high_a = RECIPE.pairs.audience_chars
    for seed in range(20):
        pairs = make_pairs(profile, 20, seed)
        assert len({(p["genre"], p["audience"]) for p in pairs}) == 20
        assert len({p["genre"] for p in pairs[:5]}) == 5  # the usual five differ in genre
        for pair in pairs:
            assert (
                low_g <= len(pair["genre"]) <= high_g and low_a <= len(pair["audience"]) <= high_a
            )
