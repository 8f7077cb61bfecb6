"""Is a rewrite faithful to its source and to its pair? Two checks a reader makes that
keyword coverage and copy ratio cannot:

- `label_echo`: the rewrite repeats a run of words of its own genre or audience
  description ("curious readers with no background in the field") that the source does
  not hold: it talks about its reader instead of writing for them. Real SmolLM2 rows do
  this with runs of 5-7 words, under the 10 of `detectors.prompt_echo`.
- `invented_facts`: numbers (years, dates, counts, measures) and names the rewrite states
  and its source does not hold: a pretraining corpus with invented dates teaches wrong
  facts. Counted per row (the `invented_facts` column of every row), rejected above the
  recipe's `max_invented_numbers` or `max_invented_names`.

Both compare words, never meaning: a fact restated in other words is not caught, and a
name the rewrite adds from common knowledge ("Europe" for a text about France) counts.
The thresholds are measured on hand-labelled real answers
(`tests/fixtures/smollm2_outputs.jsonl`, see docs/real-model.md).
"""

from __future__ import annotations

import re
from functools import lru_cache

from maga_tasks.method.text import vocabulary, word_line, words
from maga_tasks.reject_reasons import RejectReason

# -- label echo --------------------------------------------------------------------------

LABEL_ECHO_RUN = 5
# Words that carry no content of their own: a run of the description must hold at least
# two other words to be an echo ("a letter to a friend" is a natural address, not one).
_FUNCTION_WORDS = frozenset(
    "a an the and or but of to in on at for with by from as into about who whom whose which that this these those "
    "is are was were be been being it its their they them you your we our he she his her no not any some all "
    "each every how what when where why than then so very".split()
)
_MIN_CONTENT_WORDS = 2


# Where a genre's name ends: "a question-and-answer sheet | with a few questions".
_NAME_ENDS = frozenset("with for that which who whom where in on about by from to of".split())


def _genre_name_length(value_words: tuple[str, ...]) -> int:
    """How many of a genre description's first words name the genre."""
    for index, word in enumerate(value_words):
        if word in _NAME_ENDS:
            return index
    return len(value_words)


def label_echo(text: str, source: str, genre: str = "", audience: str = "", *, run: int = LABEL_ECHO_RUN):
    """(reason, detail) when the text holds `run` words in a row of its genre or audience
    description, two of them content words, that the source does not hold; else None.
    The genre's own name as a heading ("A question-and-answer sheet") is no echo."""
    if not text:
        return None
    line = None
    for label, value in (("audience", audience), ("genre", genre)):
        value_words = words(value) if value else ()
        if len(value_words) < run:
            continue
        known = vocabulary(text)
        named = _genre_name_length(value_words) if label == "genre" else 0
        for start in range(len(value_words) - run + 1):
            window = value_words[start : start + run]
            if start + run <= named:
                continue
            if not all(word in known for word in window):
                continue
            if sum(word not in _FUNCTION_WORDS for word in window) < _MIN_CONTENT_WORDS:
                continue
            phrase = f" {' '.join(window)} "
            line = line or word_line(text)
            if phrase in line and phrase not in word_line(source):
                return RejectReason.PAIR_LABEL_ECHO, f"the {label} description in the text: {phrase.strip()!r}"
    return None


# -- invented facts ------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:st|nd|rd|th|s)?(?![\w])")
_SPELLED = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
     "hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
# A capitalised word that does not open a sentence or a line: a name, a place, a title.
# (After a colon a sentence often starts again: "Question: What ...".)
_NAME = re.compile(r"(?<=[a-z0-9,)] )([A-Z][a-z]+(?:-[A-Z]?[a-z]+)*)(?:'s)?")
# Capitalised words that are not names (weekdays and months are dates: they count).
_NOT_NAMES = frozenset({"I", "Mr", "Mrs", "Ms", "Dr", "St"})


def _number_values(text: str) -> set[str]:
    """The numbers a text writes in digits, normalised (1,000 -> 1000, 3.50 -> 3.5,
    1990s -> 1990, 2nd -> 2), as strings."""
    values = set()
    for match in _NUMBER.finditer(text):
        whole, fraction = match.group(1).replace(",", ""), (match.group(2) or "").rstrip("0")
        values.add(f"{int(whole)}.{fraction}" if fraction else str(int(whole)))
    return values


@lru_cache(maxsize=256)
def _source_facts(source: str) -> tuple[frozenset[str], frozenset[str]]:
    """(numbers, lower-cased words) of a source: the digits it writes and the small
    numbers it spells out, and every word (names included)."""
    numbers = _number_values(source) | {str(_SPELLED[w]) for w in words(source) if w in _SPELLED}
    return frozenset(numbers), vocabulary(source)


@lru_cache(maxsize=64)
def invented_facts(text: str, source: str, genre: str = "", audience: str = "") -> tuple[tuple[str, ...], ...]:
    """(numbers, names) that `text` states and `source` does not hold. A name is a
    capitalised word inside a sentence; one that the pair's own descriptions use
    ("Radio" for a radio script) is not counted."""
    if not text:
        return (), ()
    numbers, source_words = _source_facts(source)
    invented = tuple(value for value in sorted(_number_values(text)) if value not in numbers)
    pair_words = vocabulary(f"{genre} {audience}")
    names = []
    for name in dict.fromkeys(_NAME.findall(text)):
        key = name.lower()
        if name in _NOT_NAMES or key in pair_words or all(part in source_words for part in words(key)):
            continue
        names.append(name)
    return invented, tuple(names)


def invented_facts_finding(text: str, source: str, genre: str, audience: str, max_numbers: int, max_names: int):
    """(reason, detail) when the text states more numbers or more names than allowed
    that its source does not hold."""
    numbers, names = invented_facts(text, source, genre, audience)
    if len(numbers) > max_numbers or len(names) > max_names:
        shown = ", ".join((*numbers, *names)[:6])
        return RejectReason.INVENTED_FACTS, (
            f"{len(numbers)} number(s) and {len(names)} name(s) not in the source "
            f"(limits {max_numbers}, {max_names}): {shown}"
        )
    return None


def invented_fact_count(text: str, source: str, genre: str = "", audience: str = "") -> int:
    """Numbers plus names the text states that its source lacks (the rows' column)."""
    numbers, names = invented_facts(text, source, genre, audience)
    return len(numbers) + len(names)
