"""A text's lower-cased form and words, computed once for all the checks of one rewrite.

Cleaning runs about ten checks on each rewrite, each of which used to lower-case and
split the text again; at a few thousand rewrites a second that was most of the client's
CPU. The caches are keyed by the string itself (Python keeps a string's hash), so the
checks of one rewrite, and the five rewrites of one source, share the work.
"""

from __future__ import annotations

import re
from functools import lru_cache

WORD = re.compile(r"\w+", re.UNICODE)


@lru_cache(maxsize=64)
def lowered(text: str) -> str:
    return text.lower()


@lru_cache(maxsize=64)
def words(text: str) -> tuple[str, ...]:
    """The text's `\\w+` words, lower-cased."""
    return tuple(WORD.findall(lowered(text)))


@lru_cache(maxsize=256)
def vocabulary(text: str) -> frozenset[str]:
    """The distinct lower-cased words of a text (a source's, asked for by five rewrites)."""
    return frozenset(words(text))


def word_line(text: str) -> str:
    """The words joined by single spaces, with a space at each end: a run of words is in
    the text exactly when `" " + " ".join(run) + " "` is a substring of this."""
    return f" {' '.join(words(text))} "
