"""Detectors for what real small models get wrong, each a reject reason of its own.

Collected from SmolLM2-135M-Instruct on real Wikipedia summaries
(tests/fixtures/smollm2_outputs.jsonl): rewrites that echo the prompt or the chat
template, loop on a phrase, refuse or talk about being an AI, talk about the rewriting
task instead of the topic, switch language; and
genre/audience "descriptions" that are a name, a place, one word or a JSON fragment.
Cleaning runs them on every rewrite (and on every pair); the quality report runs them
again, independently, over what was accepted.

Each detector returns `(reason, detail)` when it fires and None otherwise.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from maga_tasks.method.text import lowered, vocabulary, word_line, words
from maga_tasks.reject_reasons import RejectReason

Finding = tuple[str, str] | None

# Patterns written in lower case are searched in the lower-cased text, compiled without
# IGNORECASE: Python's re runs them 2-3 times faster so. And a cheap first look (one
# scan for all the phrase patterns, one for the line labels, a test for brackets) skips
# the scans that cannot match: cleaning is most of the client's CPU at zero latency
# (`maga bench --suite client`).


def _excerpt(text: str, low: str, match: re.Match) -> str:
    # The original casing where lower-casing kept every position (nearly always).
    source = text if len(low) == len(text) else low
    return source[match.start() : match.end()].strip()[:60]


# -- echo of the prompt or the chat template -------------------------------------------

# Lines our prompts put around the document or the task (maga_tasks/recipes/*.yaml); each
# a pattern of its own, and all of them in one line-start scan that tells which may match.
_TASK = r"(?:#+\s*)?(?:TASK|Task)\s*(?::|\"|-)"  # case matters: searched in the text itself
_PAIR = r"[*_#>-]*\s*(?:genre|audience)\s*[*_]*\s*:"
_DOCUMENT = r"(?:source\s+)?document\s*:"
_LANGUAGE = r"language\s*:"
_ROLE_LINE = r"(?:system|user|assistant)\s*$"
_TASK_LINE = re.compile(rf"^\s*{_TASK}", re.MULTILINE)
_PAIR_LABEL = re.compile(rf"^\s*{_PAIR}", re.MULTILINE)
_DOCUMENT_BLOCK = re.compile(rf"^\s*{_DOCUMENT}", re.MULTILINE)
_LANGUAGE_LINE = re.compile(rf"^\s*{_LANGUAGE}", re.MULTILINE)
_LABEL_LINES = re.compile(  # in the lower-cased text, so "TASK|Task" becomes "task" there
    rf"^\s*(?:{_TASK.replace('(?:TASK|Task)', 'task')}|{_PAIR}|{_DOCUMENT}|{_LANGUAGE}|{_ROLE_LINE})", re.MULTILINE
)
# These two need a bracket ("<", ">" or "[") or a role name alone on a line.
_DELIMITER = re.compile(r"^\s*(?:<<<|>>>)|(?:<<<|>>>)\s*$", re.MULTILINE)
_ROLE_TOKEN = re.compile(
    r"<\|(?:im_start|im_end|endoftext|system|user|assistant|eot_id|start_header_id|end_header_id)\|>"
    rf"|\[/?inst\]|<</?sys>>|^\s*{_ROLE_LINE}",
    re.MULTILINE,
)
_INSTRUCTION_ECHO = re.compile(
    r"\b(?:rewrite the (?:document|text) (?:above|below)|for this genre and audience|for this reader\b|"
    r"the (?:document|text|article) above|propose \d+ genre/audience pairs|information points? of the document|"
    r"output only the (?:final|rewritten) text|no preamble, notes or remarks|with no (?:preamble|notes)|"
    r"(?:reworked|rewritten|reformulated) for a new (?:kind of text|reader)|can be reformatted as follows|"
    r"(?:a|the) rewritten version of the (?:document|text))"
)
# (pattern, what it finds, searched in the lower-cased text), in the order they are reported
_MARKUP = (
    (_ROLE_TOKEN, "a chat role token", True),
    (_TASK_LINE, "a task line", False),
    (_DELIMITER, "a <<< / >>> delimiter", False),
    (_PAIR_LABEL, "a Genre:/Audience: label", True),
    (_DOCUMENT_BLOCK, "a Document: label", True),
    (_LANGUAGE_LINE, "a Language: line", True),
)
# Ten words in a row of the pair's own description: the prompt, not a rewrite of the source.
_ECHO_RUN = 10


def prompt_echo(text: str, genre: str = "", audience: str = "") -> Finding:
    """Task lines, delimiters, role tokens, the pair's labels, the instructions, or ten
    words in a row of the genre or audience description (naming them briefly is fine)."""
    low = lowered(text)
    if "<" in text or ">" in text or "[" in text or _LABEL_LINES.search(low):
        for pattern, what, in_lowered in _MARKUP:
            match = pattern.search(low if in_lowered else text)
            if match:
                return RejectReason.PROMPT_ECHO, f"{what}: {_excerpt(text, low, match)!r}"
    if _has_phrase(text):
        match = _INSTRUCTION_ECHO.search(low)
        if match:
            return RejectReason.PROMPT_ECHO, f"the instructions: {_excerpt(text, low, match)!r}"
    for label, value in (("genre", genre), ("audience", audience)):
        if value and _shares_run(text, value, _ECHO_RUN):
            return RejectReason.PROMPT_ECHO, f"the {label} description copied into the text"
    return None


def _shares_run(text: str, value: str, size: int) -> bool:
    """Whether `size` words in a row of the value occur in the text, in that order."""
    value_words = words(value)
    known = vocabulary(text)
    streak = 0
    line = None
    for end, word in enumerate(value_words, 1):
        streak = streak + 1 if word in known else 0
        if streak >= size:  # every word of this run is in the text: are they in a row?
            line = line or word_line(text)
            if f" {' '.join(value_words[end - size : end])} " in line:
                return True
    return False


# -- repetition loops ----------------------------------------------------------------

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def repetition(text: str, *, max_repeated_share: float = 0.6, max_same_sentence: int = 3) -> Finding:
    """A text that loops: one sentence or line many times, or most of its 4-word runs
    repeated (a degenerate sampler repeats itself long before max_tokens)."""
    split = (s.split() for s in _SENTENCE.findall(lowered(text)))
    sentences = [" ".join(parts) for parts in split if len(parts) >= 4]
    if sentences:
        sentence, count = Counter(sentences).most_common(1)[0]
        if count >= max_same_sentence:
            return RejectReason.REPETITION, f"a sentence repeated {count} times: {sentence[:60]!r}"
    w = words(text)
    if len(w) >= 23:  # 20 runs of 4 words
        counts = Counter(zip(w, w[1:], w[2:], w[3:], strict=False))
        repeated = sum(c for c in counts.values() if c > 1)
        share = repeated / (len(w) - 3)
        if share > max_repeated_share:
            return RejectReason.REPETITION, f"{share:.2f} of 4-word runs repeated > {max_repeated_share}"
    return None


# -- refusals and talk about being an AI ---------------------------------------------

_REFUSAL = re.compile(
    r"\b(?:as an ai\b|as a (?:large )?language model|i(?:'m| am) (?:an ai|a language model|sorry)|"
    r"i (?:cannot|can't|can not|am unable to|won't) (?:help|assist|provide|rewrite|do that|fulfil|comply)|"
    r"i don't have (?:access|the ability|personal)|please provide (?:the|more|a)|"
    r"could you (?:please )?(?:provide|clarify|share)|i'd be happy to help|i'm ready to help|"
    r"would you like me to|what (?:genre|audience|format|text|kind of)\b[^.?!]*\bwould you like|"
    r"is there (?:a|an|any)\b[^.?!]*\bmissing\?|please provide feedback)"
)


def refusal(text: str) -> Finding:
    if not _has_phrase(text):
        return None
    low = lowered(text)
    match = _REFUSAL.search(low)
    return (RejectReason.REFUSAL, f"{_excerpt(text, low, match)!r}") if match else None


# -- talk about the task instead of the text ------------------------------------------

# Words a rewrite of an encyclopedia text has no reason to use unless the source does:
# the model describing its rewriting ("Rewritten text:", "In this rewritten text, the
# events were reorganized", "Rewrite this text in plain language:"), addressing the text
# it was given ("the original text", "my previous response") or announcing its answer
# ("Here's an edited version", "here is a radio script read aloud by a presenter:"); and
# in forms a rewording word does not show: its own revisions, the requester's piece, the
# text described ("This article includes ..."), the genre as an assignment. Each family
# is judged against the source on its own: a source that says "This article covers the
# art of Persia" lets its rewrites describe the article, not talk of their revisions.
# (The last four fire on 3 of 9,356 Wikipedia summaries, all "this article" hatnotes.)
_TASK_TALK = (
    re.compile(r"\b(?:rewrit\w*|rewrote|rephras\w*|reword\w*|paraphras\w*)\b"),
    re.compile(r"\b(?:the|this|your|my) (?:original |given |provided |source |above |following )?"
               r"(?:text|passage|document|response)\b"),
    re.compile(r"\bhere(?:'s|\u2019s| is| are) (?:a|an|the|my|some)\b[^.:\n]{0,60}?"
               r"\b(?:version|rewording|edit|revision|script|text)\b"),
    # The writer on its own work: "I made additional revisions", "I've made a few changes",
    # "the story I'm writing about". (Not a letter: "this letter I am writing" is its form.)
    re.compile(r"\b(?:i(?:'ve| have)? (?:made|make|did|added|add) (?:\w+ ){0,3}?"
               r"(?:revisions?|changes|edits|adjustments|tweaks|improvements|corrections)\b"
               r"|(?:the|this|my) (?:\w+ )?(?:story|article|piece|report|summary|script|post|column|text|version|draft)"
               r" (?:that )?i(?:'m| am|'ve| have)? (?:writ|wrote|creat|prepar|draft))"),
    # The requester's piece, or the writer's own, by a name for a draft: "Your piece has
    # already provided", "your article highlights", "my version". ("Your essay" is left:
    # students writing an essay are one of the catalogue's readers.)
    re.compile(r"\b(?:your|my) (?:piece|article|draft|paragraph|version|revisions?|edits)\b"),
    # The text described instead of written: "This article includes a brief overview",
    # "The article also provides details", "In this article, you will find".
    re.compile(r"\b(?:(?:(?:this|the) article|this (?:piece|summary|report|overview))"
               r"(?: also| will| aims to| tries to| is going to)?"
               r" (?:includ|provid|cover|offer|explor|discuss|describ|present|giv|contain|highlight|outlin|focus|"
               r"go into|explain|introduc|look)|in this (?:article|piece|summary)\b)"),
    # The genre as an assignment: "The news report would be written by a general
    # newspaper", "This article is tailored to". (Not a letter or a lesson plan, whose own
    # words these can be: "This lesson plan is designed for one class period".)
    re.compile(r"\b(?:the|this) (?:\w+ )?(?:report|article|story|piece|summary|script|text|post|column|sheet|explainer)"
               r" (?:would|will|should|could|can|is going to|is|has been) (?:be )?"
               r"(?:written|aimed|targeted|tailored|designed|intended|meant|adapted) (?:by|for|to|at)\b"),
)


# The letters a phrase of those patterns starts with: a look-ahead for them lets re pass
# the other word starts quickly (40% off the scan). tests/unit/method/test_detectors.py reads them
# off the patterns, so a phrase starting with another letter fails it.
PHRASE_STARTS = "acfhimnoprtwy"


def _any_of(patterns: list[re.Pattern], starts: str) -> re.Pattern:
    """One scan that matches wherever any of the patterns (each starting at a word
    boundary, with one of `starts`) does: a text it finds nothing in needs none of their
    own scans."""
    assert all(p.pattern.startswith(r"\b") for p in patterns)
    return re.compile(rf"\b(?=[{starts}])(?:" + "|".join(f"(?:{p.pattern[2:]})" for p in patterns) + ")")


_PHRASE_PATTERNS = [_INSTRUCTION_ECHO, _REFUSAL, *_TASK_TALK]
_PHRASES = _any_of(_PHRASE_PATTERNS, PHRASE_STARTS)


@lru_cache(maxsize=64)
def _has_phrase(text: str) -> bool:
    """Whether any phrase of the echo, refusal or task-talk patterns may be in the text."""
    return _PHRASES.search(lowered(text)) is not None


def task_talk(text: str, source: str) -> Finding:
    if not _has_phrase(text):
        return None
    low = lowered(text)
    for pattern in _TASK_TALK:
        match = pattern.search(low)
        if match and not pattern.search(lowered(source)):
            return RejectReason.TASK_TALK, f"talks about the task, not the topic: {_excerpt(text, low, match)!r}"
    return None


# -- another language than the source's ------------------------------------------------

# Language ID is the costliest check by far (py3langid walks every byte in Python), so
# it runs only where a cheap look is unsure, and on a bounded sample of a long text.
_LANGID_SAMPLE_CHARS = 2048
# Function words differ between languages and make up a large part of any text: a
# rewrite most of whose words occur in its source is written in the source's language.
# Real SmolLM2 rewrites in another language share under 0.05 of their words with the
# source; its good rewrites share 0.44-0.97 (tests/fixtures/smollm2_outputs.jsonl).
SAME_LANGUAGE_WORD_SHARE = 0.5
_NON_LATIN_LETTER = re.compile(r"[^\W\d_A-Za-z\u00c0-\u024f]")
_NON_LETTERS = re.compile(r"[\W\d_]+")


@lru_cache(maxsize=1)
def _identifier():
    # py3langid ships its model in the wheel: no download, deterministic.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's language (a long text by its first
    and last 1 KB)."""
    if len(text) > _LANGID_SAMPLE_CHARS:
        half = _LANGID_SAMPLE_CHARS // 2
        text = f"{text[:half]} {text[-half:]}"
    code, probability = _identifier().classify(text)
    return code, float(probability)


@lru_cache(maxsize=256)
def _source_language(source: str) -> str:
    # Five rewrites are judged against one source.
    return language_of(source)[0]


def shared_word_share(text: str, source: str) -> float:
    """Share of the text's words (case-folded) that occur anywhere in the source."""
    text_words = words(text)
    if not text_words:
        return 0.0
    source_words = vocabulary(source)
    return sum(map(source_words.__contains__, text_words)) / len(text_words)


@lru_cache(maxsize=256)
def _non_latin_share(text: str) -> float:
    """Share of the letters outside Latin script. The regexes scan in C; `\\w` also
    takes numerals such as "½", which `isalpha` then sets apart."""
    if text.isascii():
        return 0.0
    candidates = _NON_LATIN_LETTER.findall(text)
    if not candidates:
        return 0.0
    outside = sum(c.isalpha() and not "a" <= c.lower() <= "z" for c in candidates)
    numerals = len(candidates) - sum(c.isalpha() for c in candidates)
    letters = len(text) - sum(map(len, _NON_LETTERS.findall(text))) - numerals
    return outside / max(1, letters)


def other_language(text: str, source: str, *, min_confidence: float = 0.8) -> Finding:
    """The rewrite is in another script than its source, or confidently in another
    language (the identifier is unsure on loops, so the script decides first). Language
    ID runs only when under half of the rewrite's words occur in the source."""
    if len(text) < 40 or len(source) < 40:
        return None  # too little text to tell
    share = _non_latin_share(text)
    if share > 0.2 and _non_latin_share(source) < 0.05:
        return RejectReason.OTHER_LANGUAGE, f"{share:.0%} of letters outside the Latin script of the source"
    if shared_word_share(text, source) >= SAME_LANGUAGE_WORD_SHARE:
        return None
    want = _source_language(source)
    got, confidence = language_of(text)
    if got != want and confidence >= min_confidence:
        return RejectReason.OTHER_LANGUAGE, f"{got} ({confidence:.2f}), source is {want}"
    return None


# -- junk genre/audience pairs ---------------------------------------------------------

_JSON_FRAGMENT = re.compile(r"[{}\[\]]|\"\s*:|'\s*:|\b(?:genre|audience)\b\s*['\"]?\s*:", re.IGNORECASE)
_LOWER_WORD = re.compile(r"\b[a-z][a-z'-]+\b")


def junk_description(value: str, label: str, *, min_words: int = 3) -> Finding:
    """A genre or audience that is not a description: a JSON fragment, one word, a
    name or a place (words that are all capitalised, no ordinary lowercase words)."""
    words = value.split()
    if _JSON_FRAGMENT.search(value):
        return RejectReason.PAIRS_JUNK, f"{label} holds a JSON fragment: {value[:60]!r}"
    if len(words) < min_words:
        return RejectReason.PAIRS_JUNK, f"{label} has {len(words)} word(s), not a description: {value[:60]!r}"
    if not _LOWER_WORD.search(value):
        return RejectReason.PAIRS_JUNK, f"{label} reads as a name or place, not a description: {value[:60]!r}"
    return None


def rewrite_findings(text: str, source: str, genre: str = "", audience: str = "") -> list[tuple[str, str]]:
    """Every detector that fires on a rewrite (the quality report's independent pass)."""
    found = [
        prompt_echo(text, genre, audience),
        repetition(text),
        refusal(text),
        task_talk(text, source),
        other_language(text, source),
    ]
    return [f for f in found if f]
