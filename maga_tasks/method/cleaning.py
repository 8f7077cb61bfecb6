"""Heuristic cleaning of rewrites (MAGA step 3) and the checks that reject them.

Rewrites lose their model chatter (openers such as "Here is the rewritten text:" and
closers such as "Note: ...") and are rejected when empty, truncated, far too short or
long for their source, carrying too few of the source's keywords (drifted away), or
copying most of it word for word (plain repetition): both ends of the collapse problem.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from maga_tasks.data.schema import ACCEPTED_FINISH_REASONS
from maga_tasks.method import detectors, fidelity
from maga_tasks.method.text import vocabulary, words
from maga_tasks.recipe import Cleaning
from maga_tasks.reject_reasons import RejectReason

_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)

STOPWORDS = frozenset(
    """the and for are but not you all any can had her was one our out has him his how its may
    new now old see two who did get let put say she too use that with have this will your from
    they know want been good much some time very when come here just like long make many more
    only over such take than them well were what which while would there their these those
    into also about after again could every first other should still under where being does
    doing each few most nor off once own same so then through until why both between during
    before above below because against further itself himself herself themselves ourselves""".split()
)

# Model chatter at the start of a rewrite: a first line that introduces the text.
_OPENERS = re.compile(
    r"""^\s*(?:
        (?:sure|certainly|of\ course|okay|ok|absolutely)[!,.]?[^\n]*?(?::|\.|!)\s*$ |
        (?:here\ is|here's|here\ are|below\ is|below\ are|the\ following\ is|the\ following\ are|
           what\ follows\ is|this\ is\ (?:a|the)\ rewrit)[^\n]*$ |
        (?:rewritten|reformulated|revised)\ (?:text|version|document)\s*:?\s*$
    )""",
    re.IGNORECASE | re.VERBOSE,
)

# Model chatter at the end: a last paragraph that talks about the text or the task.
_CLOSERS = re.compile(
    r"""^\s*(?:
        note\s*: | please\ note | n\.b\. | the\ above\ (?:is|text|content|rewrite) |
        this\ (?:rewrite|rewritten\ text|version)\ (?:keeps|preserves|retains|maintains|is) |
        i\ hope\ (?:this|that) | let\ me\ know | feel\ free\ to | if\ you\ (?:need|have|want) |
        (?:i\ have|i've)\ (?:rewritten|kept|preserved|adapted)
    )""",
    re.IGNORECASE | re.VERBOSE,
)

_MAX_OPENER_CHARS = 100

_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n(.*?)\n\s*```\s*$", re.DOTALL)


def strip_boilerplate(text: str) -> tuple[str, int]:
    """The rewrite without leading/trailing chatter, and how many pieces were removed."""
    removed = 0
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    while paragraphs:
        first_line, _, rest = paragraphs[0].partition("\n")
        # An opener introduces the text: short or ending with a colon, with text after it.
        introduces = first_line.rstrip().endswith(":") or len(first_line) <= _MAX_OPENER_CHARS
        if not (_OPENERS.match(first_line) and introduces and (rest.strip() or len(paragraphs) > 1)):
            break
        removed += 1
        if rest.strip():
            paragraphs[0] = rest
        else:
            paragraphs.pop(0)
    while paragraphs and _CLOSERS.match(paragraphs[-1]):
        removed += 1
        paragraphs.pop()
    return "\n\n".join(p.strip() for p in paragraphs), removed


def _words(text: str) -> list[str]:
    """The text's lower-cased runs of 3 or more letters. Taken from its `\\w+` words
    (`text.words`, shared with the other checks): a word of letters only is its own run."""
    runs = []
    for word in words(text):
        if word.isalpha():
            if len(word) >= 3:
                runs.append(word)
        else:  # digits, "_" or numerals such as "½" inside: split as the pattern does
            runs.extend(_WORD.findall(word))
    return runs


@lru_cache(maxsize=2048)
def source_keywords(source: str, count: int) -> tuple[str, ...]:
    """The source's most frequent content words (>= 3 letters, not stopwords)."""
    counts = Counter(w for w in _words(source) if w not in STOPWORDS)
    return tuple(word for word, _ in counts.most_common(count))


def keyword_coverage(source: str, rewrite: str, count: int = 20) -> float:
    """Share of the source's top keywords that appear in the rewrite."""
    keywords = source_keywords(source, count)
    if not keywords:
        return 1.0
    # The keywords are runs of letters: found as whole words, or inside words with
    # digits or "_" (what `_words` would split out).
    tokens = vocabulary(rewrite)
    present = tokens.union(*(_WORD.findall(w) for w in tokens if not w.isalpha()))
    return round(sum(1 for k in keywords if k in present) / len(keywords), 4)


def _shingles(text: str, size: int = 8) -> set[int]:
    w = words(text)
    return set(map(hash, zip(*(w[i:] for i in range(size)), strict=False)))


@lru_cache(maxsize=256)
def _source_shingles(source: str) -> frozenset[int]:
    return frozenset(_shingles(source))


def copy_ratio(source: str, rewrite: str) -> float:
    """Share of the rewrite's 8-word runs found verbatim in the source."""
    runs = _shingles(rewrite)
    if not runs:
        return 0.0
    return round(len(runs & _source_shingles(source)) / len(runs), 4)


@dataclass(frozen=True)
class Verdict:
    text: str
    keyword_coverage: float
    reject_reason: str | None = None
    detail: str = ""
    boilerplate_removed: int = 0
    invented_facts: int | None = None  # numbers and names the source lacks (None: no text)


_DETECTORS = {
    RejectReason.PROMPT_ECHO: lambda text, source, rules, genre, audience: detectors.prompt_echo(text, genre, audience),
    RejectReason.REFUSAL: lambda text, source, rules, genre, audience: detectors.refusal(text),
    RejectReason.TASK_TALK: lambda text, source, rules, genre, audience: detectors.task_talk(text, source),
    RejectReason.REPETITION: lambda text, source, rules, genre, audience: detectors.repetition(
        text, max_repeated_share=rules.max_repeated_share
    ),
    RejectReason.OTHER_LANGUAGE: lambda text, source, rules, genre, audience: detectors.other_language(
        text, source, min_confidence=rules.min_language_confidence
    ),
    RejectReason.PAIR_LABEL_ECHO: lambda text, source, rules, genre, audience: fidelity.label_echo(
        text, source, genre, audience
    ),
    RejectReason.INVENTED_FACTS: lambda text, source, rules, genre, audience: fidelity.invented_facts_finding(
        text, source, genre, audience, rules.max_invented_numbers, rules.max_invented_names
    ),
    RejectReason.OFF_GENRE: lambda text, source, rules, genre, audience: fidelity.off_genre(text, genre),
}


def first_detector_finding(
    source: str, text: str, rules: Cleaning, genre: str = "", audience: str = ""
) -> tuple[str, str] | None:
    """The first of the recipe's detectors, in its order, that fires on a cleaned rewrite."""
    for name in rules.detectors:
        found = _DETECTORS[name](text, source, rules, genre, audience)
        if found:
            return found
    return None


def judged_by(detector: str, rules: Cleaning) -> frozenset[str] | None:
    """The reject reasons of rows that `detector` judged before they were rejected:
    its own and those of the recipe's detectors after it (`clean_rewrite` stops at a
    row's first failed check, and the detectors run last, in the recipe's order; every
    accepted row was judged too). None when the recipe does not run `detector`."""
    if detector not in rules.detectors:
        return None
    return frozenset(rules.detectors[rules.detectors.index(detector) :])


def echo_judged_by(rules: Cleaning) -> frozenset[str] | None:
    """`judged_by` of the label-echo check: the reasons behind a shard's label-echo rate."""
    return judged_by(RejectReason.PAIR_LABEL_ECHO, rules)


def clean_rewrite(
    source: str, rewrite: str, finish_reason: str, rules: Cleaning, genre: str = "", audience: str = ""
) -> Verdict:
    """Clean one rewrite and decide whether it is accepted."""
    text, removed = strip_boilerplate(rewrite or "")
    coverage = keyword_coverage(source, text, rules.keyword_count) if text else 0.0
    # Counted on every row with a text, so users can filter stricter than the recipe.
    facts = fidelity.invented_fact_count(text, source, genre, audience) if text.strip() else None

    def reject(reason: RejectReason, detail: str = "") -> Verdict:
        return Verdict(text, coverage, reason, detail, removed, facts)

    if finish_reason == "length":
        return reject(RejectReason.TRUNCATED, "the model hit max_tokens before finishing")
    if finish_reason not in ACCEPTED_FINISH_REASONS:
        return reject(RejectReason.UNEXPECTED_FINISH_REASON, finish_reason)
    if not text.strip():
        return reject(RejectReason.EMPTY)
    if len(text) < rules.min_chars:
        return reject(RejectReason.TOO_SHORT, f"{len(text)} chars < {rules.min_chars}")
    ratio = len(text) / max(1, len(source))
    if ratio < rules.min_length_ratio:
        return reject(RejectReason.TOO_SHORT_FOR_SOURCE, f"length ratio {ratio:.2f} < {rules.min_length_ratio}")
    if ratio > rules.max_length_ratio:
        return reject(RejectReason.TOO_LONG_FOR_SOURCE, f"length ratio {ratio:.2f} > {rules.max_length_ratio}")
    if coverage < rules.min_keyword_coverage:
        return reject(RejectReason.LOW_KEYWORD_COVERAGE, f"{coverage:.2f} < {rules.min_keyword_coverage}")
    copied = copy_ratio(source, text)
    if copied > rules.max_copy_ratio:
        return reject(RejectReason.NEAR_COPY, f"{copied:.2f} of 8-word runs copied > {rules.max_copy_ratio}")
    finding = first_detector_finding(source, text, rules, genre, audience)
    if finding:
        return reject(*finding)
    return Verdict(text, coverage, None, "", removed, facts)
