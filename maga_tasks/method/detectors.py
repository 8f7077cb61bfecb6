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

Finding = tuple[str, str] | None

# -- echo of the prompt or the chat template -------------------------------------------

# Lines our prompts put around the document or the task (maga_tasks/recipes/*.yaml).
_TASK_LINE = re.compile(r"^\s*(?:#+\s*)?(?:TASK|Task)\s*(?::|\"|-)", re.MULTILINE)
_PAIR_LABEL = re.compile(r"^\s*[*_#>-]*\s*(?:genre|audience)\s*[*_]*\s*:", re.IGNORECASE | re.MULTILINE)
_DELIMITER = re.compile(r"^\s*(?:<<<|>>>)|(?:<<<|>>>)\s*$", re.MULTILINE)
_ROLE_TOKEN = re.compile(
    r"<\|(?:im_start|im_end|endoftext|system|user|assistant|eot_id|start_header_id|end_header_id)\|>"
    r"|\[/?INST\]|<</?SYS>>|^\s*(?:system|user|assistant)\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_DOCUMENT_BLOCK = re.compile(r"^\s*(?:source\s+)?document\s*:", re.IGNORECASE | re.MULTILINE)
_INSTRUCTION_ECHO = re.compile(
    r"\b(?:rewrite the (?:document|text) (?:above|below)|for this genre and audience|for this reader\b|"
    r"the (?:document|text|article) above|propose \d+ genre/audience pairs|information points? of the document|"
    r"output only the (?:final|rewritten) text|no preamble, notes or remarks|with no (?:preamble|notes)|"
    r"(?:reworked|rewritten|reformulated) for a new (?:kind of text|reader)|can be reformatted as follows|"
    r"(?:a|the) rewritten version of the (?:document|text))",
    re.IGNORECASE,
)
_LANGUAGE_LINE = re.compile(r"^\s*language\s*:", re.IGNORECASE | re.MULTILINE)
# Ten words in a row of the pair's own description: the prompt, not a rewrite of the source.
_ECHO_RUN = 10


def prompt_echo(text: str, genre: str = "", audience: str = "") -> Finding:
    """Task lines, delimiters, role tokens, the pair's labels, the instructions, or ten
    words in a row of the genre or audience description (naming them briefly is fine)."""
    for pattern, what in (
        (_ROLE_TOKEN, "a chat role token"),
        (_TASK_LINE, "a task line"),
        (_DELIMITER, "a <<< / >>> delimiter"),
        (_PAIR_LABEL, "a Genre:/Audience: label"),
        (_DOCUMENT_BLOCK, "a Document: label"),
        (_LANGUAGE_LINE, "a Language: line"),
        (_INSTRUCTION_ECHO, "the instructions"),
    ):
        match = pattern.search(text)
        if match:
            return "prompt_echo", f"{what}: {match.group(0).strip()[:60]!r}"
    words = _word_runs(text, _ECHO_RUN)
    for label, value in (("genre", genre), ("audience", audience)):
        if value and words & _word_runs(value, _ECHO_RUN):
            return "prompt_echo", f"the {label} description copied into the text"
    return None


def _word_runs(text: str, size: int) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _TOKEN.findall(text)]
    return {tuple(words[i : i + size]) for i in range(len(words) - size + 1)}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


# -- repetition loops ----------------------------------------------------------------

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_TOKEN = re.compile(r"\w+", re.UNICODE)


def repetition(text: str, *, max_repeated_share: float = 0.6, max_same_sentence: int = 3) -> Finding:
    """A text that loops: one sentence or line many times, or most of its 4-word runs
    repeated (a degenerate sampler repeats itself long before max_tokens)."""
    sentences = [_normalise(s) for s in _SENTENCE.findall(text) if len(s.split()) >= 4]
    if sentences:
        sentence, count = Counter(sentences).most_common(1)[0]
        if count >= max_same_sentence:
            return "repetition", f"a sentence repeated {count} times: {sentence[:60]!r}"
    words = [w.lower() for w in _TOKEN.findall(text)]
    runs = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if len(runs) >= 20:
        counts = Counter(runs)
        repeated = sum(c for c in counts.values() if c > 1)
        share = repeated / len(runs)
        if share > max_repeated_share:
            return "repetition", f"{share:.2f} of 4-word runs repeated > {max_repeated_share}"
    return None


# -- refusals and talk about being an AI ---------------------------------------------

_REFUSAL = re.compile(
    r"\b(?:as an ai\b|as a (?:large )?language model|i(?:'m| am) (?:an ai|a language model|sorry)|"
    r"i (?:cannot|can't|can not|am unable to|won't) (?:help|assist|provide|rewrite|do that|fulfil|comply)|"
    r"i don't have (?:access|the ability|personal)|please provide (?:the|more|a)|"
    r"could you (?:please )?(?:provide|clarify|share)|i'd be happy to help|i'm ready to help|"
    r"would you like me to|what (?:genre|audience|format|text|kind of)\b[^.?!]*\bwould you like|"
    r"is there (?:a|an|any)\b[^.?!]*\bmissing\?|please provide feedback)",
    re.IGNORECASE,
)


def refusal(text: str) -> Finding:
    match = _REFUSAL.search(text)
    return ("refusal", f"{match.group(0)!r}") if match else None


# -- talk about the task instead of the text ------------------------------------------

# Words a rewrite of an encyclopedia text has no reason to use unless the source does:
# the model describing its rewriting ("Rewritten text:", "In this rewritten text, the
# events were reorganized", "Rewrite this text in plain language:"), addressing the text
# it was given ("the original text", "my previous response") or announcing its answer
# ("Here's an edited version", "here is a radio script read aloud by a presenter:").
_TASK_TALK = (
    re.compile(r"\b(?:rewrit\w*|rewrote|rephras\w*|reword\w*|paraphras\w*)\b", re.IGNORECASE),
    re.compile(r"\b(?:the|this|your|my) (?:original |given |provided |source |above |following )?"
               r"(?:text|passage|document|response)\b", re.IGNORECASE),
    re.compile(r"\bhere(?:'s|\u2019s| is| are) (?:a|an|the|my|some)\b[^.:\n]{0,60}?"
               r"\b(?:version|rewording|edit|revision|script|text)\b", re.IGNORECASE),
)


def task_talk(text: str, source: str) -> Finding:
    for pattern in _TASK_TALK:
        match = pattern.search(text)
        if match and not pattern.search(source):
            return "task_talk", f"talks about the task, not the topic: {match.group(0)!r}"
    return None


# -- another language than the source's ------------------------------------------------


@lru_cache(maxsize=1)
def _identifier():
    # py3langid ships its model in the wheel: no download, deterministic.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_of(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the text's language."""
    code, probability = _identifier().classify(text)
    return code, float(probability)


def _non_latin_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(not ("a" <= c.lower() <= "z" or "\u00c0" <= c <= "\u024f") for c in letters) / max(1, len(letters))


def other_language(text: str, source: str, *, min_confidence: float = 0.8) -> Finding:
    """The rewrite is in another script than its source, or confidently in another
    language (the identifier is unsure on loops, so the script decides first)."""
    if len(text) < 40 or len(source) < 40:
        return None  # too little text to tell
    share = _non_latin_share(text)
    if share > 0.2 and _non_latin_share(source) < 0.05:
        return "other_language", f"{share:.0%} of letters outside the Latin script of the source"
    want, _ = language_of(source)
    got, confidence = language_of(text)
    if got != want and confidence >= min_confidence:
        return "other_language", f"{got} ({confidence:.2f}), source is {want}"
    return None


# -- junk genre/audience pairs ---------------------------------------------------------

_JSON_FRAGMENT = re.compile(r"[{}\[\]]|\"\s*:|'\s*:|\b(?:genre|audience)\b\s*['\"]?\s*:", re.IGNORECASE)
_LOWER_WORD = re.compile(r"\b[a-z][a-z'-]+\b")


def junk_description(value: str, label: str, *, min_words: int = 3) -> Finding:
    """A genre or audience that is not a description: a JSON fragment, one word, a
    name or a place (words that are all capitalised, no ordinary lowercase words)."""
    words = value.split()
    if _JSON_FRAGMENT.search(value):
        return "pairs_junk", f"{label} holds a JSON fragment: {value[:60]!r}"
    if len(words) < min_words:
        return "pairs_junk", f"{label} has {len(words)} word(s), not a description: {value[:60]!r}"
    if not _LOWER_WORD.search(value):
        return "pairs_junk", f"{label} reads as a name or place, not a description: {value[:60]!r}"
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
