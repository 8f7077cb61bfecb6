"""A deterministic OpenAI-compatible LLM server for tests, staging and trial runs.

It speaks the slice of vLLM's HTTP API the pipeline uses (`/health`, `/v1/models`,
non-streaming `/v1/chat/completions`, `/metrics`) and answers the three MAGA calls
(pairs, rewrite, judge) without a model: every answer is a pure function of the source
document, the task and the seed, so runs are reproducible and need no GPU. Answers are
built to pass the pipeline's own checks: pairs fit the recipe's length bounds, rewrites
keep the source's keywords without copying its 8-word runs, the judge scores word
overlap.

Switches inject the failures a real fleet produces, so the client's retry and
rejection paths can be exercised against a real socket rather than a monkeypatch.

Fault specs (repeatable), ``KIND[:RATE[:TIMES]][:KEY=VALUE...]``:

* RATE (default 1.0) is the share of requests the fault is aimed at, chosen by hashing
  the request key, so the same requests are hit on every run.
* TIMES caps how often the fault fires per request (document/stage/pair): an integer
  or ``inf``. Default 1 for transient faults, ``inf`` for content faults.
* Options: ``rate=``, ``times=``, ``hang=SECONDS`` (timeout only, default 30) and
  ``stage=pairs+rewrite`` to narrow the stages a fault applies to.

Transient faults are aimed by the request key without the attempt number, so a retry
of a hit request is hit again until the fault has fired TIMES times: ``http500``,
``http429`` (with ``Retry-After: 0``), ``timeout`` (sleep ``hang`` seconds, then
answer) and ``disconnect`` (close the connection without a response).

Content faults are aimed by the full key with attempt and seed, so a retry with a new
seed may escape: ``bad_json`` (pairs: prose instead of JSON), ``wrong_count`` (pairs:
one pair short or a duplicate), ``truncate`` (rewrite: cut in the middle, finish
reason "length"), ``boilerplate`` (rewrite wrapped in assistant chatter), ``empty``
(rewrite: empty content) and ``off_topic`` (rewrite: text sharing no word with the
source).

``die_after:N`` makes the process exit (``os._exit``) once N chat completion requests
have been answered (any status), like a worker that dies under load.

Faults are tried in the order given and the first that fires wins. Examples:
``http500:0.2:2``, ``timeout:0.1:1:hang=5``, ``bad_json:1:stage=pairs+judge``.

Requests are identified by the client's ``X-Request-Id: DOC/STAGE/PAIR/ATTEMPT`` (four
'/'-separated fields, STAGE one of pairs/rewrite/judge, ATTEMPT the transport attempt);
without it the stage comes from the task's first line and hashes of the document and
task stand in for the key. Besides the vLLM routes, ``GET /_stats`` returns request, fault and token
counts (``POST /_reset`` clears them) for tests and benchmarks to check against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp import web

from maga_tasks.method.prompts import DOCUMENT_CLOSE, DOCUMENT_OPEN

STAGES = ("pairs", "rewrite", "judge")
TRANSIENT_KINDS = ("http500", "http429", "timeout", "disconnect")
CONTENT_KINDS = ("bad_json", "wrong_count", "truncate", "boilerplate", "empty", "off_topic")
# Stages each kind may apply to, and the default when the spec names none. Content
# faults default to the stage whose output they spoil in the method's description.
ALLOWED_STAGES = {
    **{kind: frozenset(STAGES) for kind in TRANSIENT_KINDS},
    "bad_json": frozenset({"pairs", "judge"}),
    "wrong_count": frozenset({"pairs"}),
    "truncate": frozenset(STAGES),
    "boilerplate": frozenset({"rewrite"}),
    "empty": frozenset(STAGES),
    "off_topic": frozenset({"rewrite"}),
}
DEFAULT_STAGES = {
    **{kind: frozenset(STAGES) for kind in TRANSIENT_KINDS},
    "bad_json": frozenset({"pairs"}),
    "wrong_count": frozenset({"pairs"}),
    "truncate": frozenset({"rewrite"}),
    "boilerplate": frozenset({"rewrite"}),
    "empty": frozenset({"rewrite"}),
    "off_topic": frozenset({"rewrite"}),
}
KINDS = (*TRANSIENT_KINDS, *CONTENT_KINDS, "die_after")
DEFAULT_HANG_S = 30.0
MAX_MODEL_LEN = 8192


# ---------------------------------------------------------------------------------------
# Fault specs


@dataclass(frozen=True)
class Fault:
    """One injected failure mode; build it with `parse_fault`."""

    kind: str
    rate: float = 1.0
    times: float = 1  # math.inf for no cap
    hang_s: float = DEFAULT_HANG_S
    stages: frozenset[str] = frozenset(STAGES)
    after: int = 0  # die_after only: chat completions answered before the exit

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS

    def aims_at(self, key: str) -> bool:
        """Whether this fault is aimed at the request with this selection key."""
        return self.rate >= 1.0 or _unit_hash(self.kind, key) < self.rate


def _parse_rate(text: str, spec: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"bad fault spec {spec!r}: RATE must be a number in [0, 1], got {text!r}")
    return rate


def _parse_times(text: str, spec: str) -> float:
    if text.lower() in ("inf", "*"):
        return math.inf
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"bad fault spec {spec!r}: TIMES must be an integer >= 1 or 'inf', got {text!r}"
        )
    return int(text)


def _parse_seconds(text: str, spec: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0.0 <= seconds <= 86400.0:
        raise ValueError(
            f"bad fault spec {spec!r}: hang must be seconds in [0, 86400], got {text!r}"
        )
    return seconds


def _parse_stages(text: str, kind: str, spec: str) -> frozenset[str]:
    stages = frozenset(s.strip() for s in text.split("+") if s.strip())
    wrong = stages - ALLOWED_STAGES[kind]
    if not stages or wrong:
        allowed = "+".join(s for s in STAGES if s in ALLOWED_STAGES[kind])
        raise ValueError(
            f"bad fault spec {spec!r}: stage for {kind} must be among {allowed}, got {text!r}"
        )
    return stages


def _parse_die_after(parts: list[str], spec: str) -> Fault:
    if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"bad fault spec {spec!r}: expected die_after:N with N an integer >= 0")
    return Fault(kind="die_after", after=int(parts[1]), stages=frozenset(STAGES))


def parse_fault(spec: str) -> Fault:
    """Parse ``KIND[:RATE[:TIMES]][:KEY=VALUE...]`` (see the module docstring).

    Raises ValueError with a one-line message naming the problem.
    """
    parts = [part.strip() for part in spec.strip().split(":")]
    kind = parts[0]
    if kind not in KINDS:
        raise ValueError(
            f"bad fault spec {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})"
        )
    if kind == "die_after":
        return _parse_die_after(parts, spec)
    values: dict[str, object] = {
        "rate": 1.0,
        "times": 1 if kind in TRANSIENT_KINDS else math.inf,
        "hang_s": DEFAULT_HANG_S,
        "stages": DEFAULT_STAGES[kind],
    }
    positional = ["rate", "times"]
    for part in parts[1:]:
        name, has_value, text = part.partition("=")
        if not has_value:
            if not positional:
                raise ValueError(
                    f"bad fault spec {spec!r}: too many positional fields (KIND:RATE:TIMES)"
                )
            name, text = positional.pop(0), part
        elif name in positional:
            positional.remove(name)
        if name == "rate":
            values["rate"] = _parse_rate(text, spec)
        elif name == "times":
            values["times"] = _parse_times(text, spec)
        elif name == "hang" and kind == "timeout":
            values["hang_s"] = _parse_seconds(text, spec)
        elif name == "stage":
            values["stages"] = _parse_stages(text, kind, spec)
        else:
            options = "rate, times, stage" + (", hang" if kind == "timeout" else "")
            raise ValueError(
                f"bad fault spec {spec!r}: unknown option {name!r} for {kind} (options: {options})"
            )
    return Fault(kind=kind, **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Deterministic text: hashing, tokens, keywords


def _digest(*parts: object) -> int:
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _unit_hash(*parts: object) -> float:
    """A stable pseudo-random number in [0, 1) for these parts."""
    return _digest(*parts) / 2.0**64


PIECE_RE = re.compile(r"\S+")
# Tokens are whitespace-separated pieces plus one per punctuation mark: close enough to
# a tokenizer for usage figures, and countable at C speed (bytes.translate), which
# matters when a benchmark drives thousands of requests per second.
_MARKS = b".,;:!?()[]{}\"'"
_NOT_MARKS = bytes(b for b in range(256) if b not in _MARKS)
WORD_RE = re.compile(r"\w+")
SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?;:])\s+|\n+")

# Function words dropped when a sentence is restated and not counted as keywords. Kept
# to the most common ones on purpose: a word dropped here could be a keyword under the
# cleaning step's own stopword list, and every keyword lost lowers coverage.
STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing during each few
    for from further had has have he her here herself him himself his how i if in into is
    it its itself just me more most much my no nor not of off on once only or other our
    ourselves out over own same she should so some such than that the their them
    themselves then there these they this those through to too under until up us very was
    we were what when where which while who why will with would you your
    """.split()
)


def _marks_in(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_MARKS))


def count_tokens(text: str) -> int:
    """Deterministic token count: words and punctuation marks."""
    return len(text.split()) + _marks_in(text)


# Prompt parts repeat: every request of a document carries the same system message and
# document text, so their counts are worth remembering (answers are not).
_count_prompt_part = functools.lru_cache(maxsize=2048)(count_tokens)


def cut_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of whole pieces holding at most `max_tokens` tokens."""
    used, end = 0, 0
    for match in PIECE_RE.finditer(text):
        used += 1 + _marks_in(match.group())
        if used > max_tokens:
            break
        end = match.end()
    return text[:end]


def _is_content_word(word: str) -> bool:
    return (len(word) >= 3 or any(c.isdigit() for c in word)) and word.lower() not in STOPWORDS


@dataclass(frozen=True)
class DocumentProfile:
    """What the answers need from a document, computed once per document."""

    chars: int
    sentences: tuple[tuple[str, ...], ...]  # content words of each sentence, in order
    keywords: tuple[str, ...]  # top-20 lower-cased keywords, most frequent first
    vocabulary: frozenset[str]  # every lower-cased word of the document


@functools.lru_cache(maxsize=512)
def profile_document(document: str) -> DocumentProfile:
    """Sentences, keywords and vocabulary of a document (LRU-cached: one document is
    asked about seven times, by the pairs, rewrite and judge calls)."""
    sentences = []
    for sentence in SENTENCE_SPLIT_RE.split(document):
        words = tuple(w for w in WORD_RE.findall(sentence) if _is_content_word(w))
        if words:
            sentences.append(words)
    counts = Counter(
        w.lower() for words in sentences for w in words if len(w) >= 3 and not w.isdigit()
    )
    keywords = tuple(word for word, _ in counts.most_common(20))
    vocabulary = frozenset(w.lower() for w in WORD_RE.findall(document))
    return DocumentProfile(len(document), tuple(sentences), keywords, vocabulary)


# ---------------------------------------------------------------------------------------
# Pairs


# Descriptions in the shape the method asks for: a genre in two or three sentences, an
# audience in about two. "{topic}" is filled with one of the document's keywords.
GENRES = (
    (
        "A step-by-step tutorial on {topic}. Each step states one idea, gives a short "
        "worked example and ends with a check the reader can do alone. Plain, direct language."
    ),
    (
        "An analytical report that examines {topic} from several angles. It opens with a "
        "summary of findings, weighs the evidence in numbered sections and closes with open "
        "questions. Formal and precise in tone."
    ),
    (
        "A conversational dialogue between a curious student and a patient tutor. The "
        "questions follow the order a newcomer would ask them. Warm, informal and concrete."
    ),
    (
        "A question-and-answer sheet about {topic}. Short questions, answers of two or three "
        "sentences, grouped from basic to advanced. Neutral and factual."
    ),
    (
        "A short narrative essay that follows one person meeting {topic} for the first time. "
        "Facts are woven into the story rather than listed. Reflective, vivid tone."
    ),
    (
        "A persuasive opinion column arguing why {topic} deserves attention. It states a "
        "claim, backs it with the facts of the source and answers one objection. Lively tone."
    ),
    (
        "A concise encyclopedia entry. Definition first, then background, key facts and "
        "related topics, in a detached and compact style without anecdotes."
    ),
    (
        "Lecture notes for a university seminar on {topic}. Headed sections, terms defined "
        "on first use, and a closing list of points to remember. Academic but readable."
    ),
    (
        "A newsletter feature for a general magazine. A hook in the first line, short "
        "paragraphs and one memorable comparison per idea. Friendly and brisk."
    ),
    (
        "A practical field guide: what to look for, why it matters and what to do about it. "
        "Bulleted checklists and warnings in a calm, matter-of-fact voice."
    ),
    (
        "A debate brief setting out arguments for and against the main claims about {topic}. "
        "Each side gets equal space; the conclusion stays balanced. Crisp and logical."
    ),
    (
        "A bedtime-style explanatory story told in simple sentences. Everyday comparisons make "
        "each idea concrete. Gentle, patient tone with no jargon."
    ),
    (
        "A technical briefing memo for busy decision makers. Bottom line first, then the "
        "supporting facts, risks and next steps. Terse, professional language."
    ),
    (
        "A study guide with key terms, a short summary and five review questions about "
        "{topic}. Organised for revision before an exam; clear and encouraging."
    ),
)

AUDIENCES = (
    (
        "Secondary-school students aged 14 to 16 who meet the topic in class. They know the "
        "basics of science and history and want clear examples."
    ),
    (
        "Retired engineers who read widely in their free time. They enjoy detail and notice "
        "vague claims."
    ),
    (
        "Busy parents with little spare time and no background in {topic}. They read on a "
        "phone and want the practical upshot."
    ),
    (
        "First-year university students in a general-education course. They must write an "
        "essay and need reliable facts and terms."
    ),
    (
        "Small-business owners wondering whether {topic} affects their work. Practical "
        "readers who skim for what changes their decisions."
    ),
    (
        "Adult learners improving their English as a second language. They prefer short "
        "sentences and common words."
    ),
    (
        "Science journalists looking for a story. They know research methods and want the "
        "surprising angle."
    ),
    (
        "Teenagers who find the subject boring and read only because it was assigned. They "
        "need a reason to care."
    ),
    (
        "Policy advisers preparing a briefing. They want consequences, numbers and trade-offs "
        "rather than background."
    ),
    (
        "Hobbyists and amateur enthusiasts who already read forums about {topic}. They like "
        "depth and correct terminology."
    ),
    (
        "Primary-school teachers planning a lesson. They need accurate content they can adapt "
        "for children aged 8 to 10."
    ),
    (
        "Nurses and care workers on a short break. Practical minds with medical training but "
        "little time."
    ),
    (
        "Curious retirees who left school early. Life experience rich, formal schooling thin; "
        "they value plain explanations."
    ),
    (
        "Software developers with no training in {topic}. Analytical readers who like "
        "systems, lists and precise definitions."
    ),
)


def _topic(profile: DocumentProfile, index: int) -> str:
    if not profile.keywords:
        return "the subject"
    return profile.keywords[index % min(len(profile.keywords), 5)][:40]


def make_pairs(profile: DocumentProfile, n: int, salt: object) -> list[dict[str, str]]:
    """`n` distinct genre/audience pairs chosen by hashing the document and seed."""
    start = _digest("pairs", salt)
    n_genres, n_audiences = len(GENRES), len(AUDIENCES)
    pairs = []
    for k in range(max(n, 0)):
        # Step through all genre x audience combinations with a stride coprime to their
        # number, so the first len(GENRES) pairs have distinct genres and none repeats.
        combo = (start + k * (n_genres + 1)) % (n_genres * n_audiences)
        genre = GENRES[combo % n_genres]
        audience = AUDIENCES[(combo // n_genres + start) % n_audiences]
        topic = _topic(profile, k)
        pairs.append({"genre": genre.format(topic=topic), "audience": audience.format(topic=topic)})
    return pairs


def pairs_answer(profile: DocumentProfile, n: int, salt: object) -> str:
    return json.dumps({"pairs": make_pairs(profile, n, salt)}, ensure_ascii=False)


# ---------------------------------------------------------------------------------------
# Rewrite


CONNECTORS = ("; ", ", ", " - ", ", then ", ", with ", "; also ")


FIRST_SENTENCE_RE = re.compile(r"(?<=[.!?])\s")


def _first_sentence(text: str, limit: int) -> str:
    sentence = FIRST_SENTENCE_RE.split(text.strip(), maxsplit=1)[0].rstrip(".!? ")
    if len(sentence) > limit:
        # Cut at a word boundary and drop dangling function words ("... spare time and").
        kept = sentence[:limit].split(" ")[:-1]
        while len(kept) > 1 and kept[-1].lower() in STOPWORDS:
            kept.pop()
        sentence = " ".join(kept)
    return sentence[:1].lower() + sentence[1:] if sentence else "a plain text"


def _restate(words: tuple[str, ...], salt: int) -> str:
    """One source sentence restated from its content words in another order.

    Words are grouped in chunks of 2-4 and the chunks are written last to first, so no
    run of the rewrite crosses a chunk boundary in the source's order: the rewrite
    shares (almost) no 8-word run with the source.
    """
    size = 2 + salt % 3
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    chunks.reverse()
    connector = CONNECTORS[salt % len(CONNECTORS)]
    text = connector.join(chunks)
    return text[:1].upper() + text[1:] + "."


def _intro(genre: str, audience: str, keywords: tuple[str, ...], salt: int) -> str:
    shape = _first_sentence(genre, 90)
    reader = _first_sentence(audience, 70)
    subjects = ", ".join(keywords[:3]) or "its subject"
    if salt % 2:
        return f"Presented as {shape}, this text is meant for {reader}. It is about {subjects}."
    return f"Written for {reader}, this text takes the form of {shape}. Its subjects: {subjects}."


def make_rewrite(profile: DocumentProfile, genre: str, audience: str, salt: object) -> str:
    """A rewrite that keeps every content word of the source, reordered.

    Length lands between half and twice the source (at least 80 characters for all but
    tiny sources), inside the cleaning step's bounds.
    """
    seed = _digest("rewrite", genre, audience, salt)
    low, high = _rewrite_length_bounds(profile.chars)
    sentences = profile.sentences
    shift = seed % len(sentences) if sentences else 0
    ordered = sentences[shift:] + sentences[:shift]
    body = [_restate(words, (seed >> 8) + 7 * i) for i, words in enumerate(ordered)]
    # The framing sentence comes first; a short source gets a shorter one, or none, so
    # the framing never crowds out the source's own words.
    intros = (
        _intro(genre, audience, profile.keywords, seed),
        f"For {_first_sentence(audience, 40)}:",
    )
    framing = next((i for i in intros if len(i) + len(" ".join(body)) < high), None)
    parts = [framing, *body] if framing else body
    # A source rich in short function words restates short: add passes with other
    # chunkings until the floor is met (each pass again shares no 8-word run).
    passes = 1
    while sentences and len(_join_paragraphs(parts)) < low and passes < 8:
        parts.extend(_restate(words, seed + passes * 7) for words in ordered)
        passes += 1
    text = _join_paragraphs(parts)
    if len(text) < low:
        text += " In short: " + ", ".join(profile.keywords or ("the subject",)) + "."
    while len(text) < low:  # wordless sources
        text += " The text keeps to its single point and adds nothing else to it."
    if len(text) > high:
        text = text[:high].rsplit(" ", 1)[0].rstrip(",;-") + "."
    return text.strip()


def _rewrite_length_bounds(source_chars: int) -> tuple[int, int]:
    """(min, max) characters of an honest rewrite: half to twice the source, at least 80.

    A source of under ~23 characters cannot take 80 without exceeding the cleaning step's
    4x ratio, so there the floor shrinks toward its 50-character minimum instead.
    """
    low = max(source_chars // 2, 50, min(80, int(3.5 * source_chars)))
    high = max(2 * source_chars, min(160, 4 * source_chars - 1), low)
    return low, high


def _join_paragraphs(sentences: list[str]) -> str:
    return "\n\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4))


# ---------------------------------------------------------------------------------------
# Judge


def judge_answer(profile: DocumentProfile, rewrite: str | None) -> str:
    """Score limited consistency by the share of the document's keywords kept."""
    if not rewrite or not rewrite.strip():
        analysis = "No rewritten text was given, so nothing derives from the document."
        return json.dumps({"analysis": analysis, "score": 1})
    words = {w.lower() for w in WORD_RE.findall(rewrite)}
    keywords = profile.keywords
    kept = sum(1 for word in keywords if word in words)
    share = kept / len(keywords) if keywords else 0.0
    score = (
        5 if share >= 0.6 else 4 if share >= 0.4 else 3 if share >= 0.2 else 2 if share > 0.0 else 1
    )
    analysis = (
        f"The rewrite keeps {kept} of the document's {len(keywords)} main keywords "
        f"({share:.0%}), so it is {_VERDICTS[score]}."
    )
    return json.dumps({"analysis": analysis, "score": score})


_VERDICTS = {
    5: "clearly derived from it and keeps most information points",
    4: "derived from it and keeps the main points",
    3: "recognisably derived from it and keeps some points",
    2: "hardly recognisable as derived from it",
    1: "unrelated to it",
}

REWRITE_OPEN = "Rewritten text:\n<<<\n"
REWRITE_CLOSE = "\n>>>"


def rewrite_in_judge_task(task: str) -> str | None:
    start = task.find(REWRITE_OPEN)
    if start < 0:
        return None
    start += len(REWRITE_OPEN)
    end = task.rfind(REWRITE_CLOSE, start)
    return task[start:end] if end >= start else task[start:]


# ---------------------------------------------------------------------------------------
# Content faults: how a misbehaving model spoils an answer


PREAMBLES = (
    "Sure! Here is the rewritten text:",
    "The following is a rewritten version of the document for the requested audience.",
    "Certainly. Below is the rewrite you asked for.",
)
CLOSERS = (
    "Note: all information points of the original have been kept.",
    "I hope this helps! Let me know if you would like any changes.",
    "Please note that some details were simplified for the audience.",
    "The above is as required by the task.",
)
OFF_TOPIC_TEXT = (
    "Sourdough bread begins with a starter: flour and water left to ferment for several "
    "days until wild yeast and lactobacilli make it bubble. Bakers feed the starter daily, "
    "discard part of it, and judge readiness by smell and rise. Dough is folded gently "
    "every half hour, shaped, proofed overnight in a cool place, then baked very hot in a "
    "covered pot so steam builds a crisp, blistered crust around an open crumb. "
)


def spoil(
    kind: str, answer: str, stage: str, profile: DocumentProfile, salt: int
) -> tuple[str, bool]:
    """Apply a content fault to an answer; returns (content, cut_for_length)."""
    if kind == "empty":
        return "", False
    if kind == "truncate":
        return cut_to_tokens(answer, max(1, count_tokens(answer) // 2)), True
    if kind == "bad_json":
        return _prose_instead_of_json(answer, stage), False
    if kind == "wrong_count":
        return _wrong_count(answer, salt), False
    if kind == "boilerplate":
        return f"{PREAMBLES[salt % 3]}\n\n{answer}\n\n{CLOSERS[(salt >> 4) % 4]}", False
    if kind == "off_topic":
        return _off_topic(profile), False
    raise AssertionError(kind)


def _prose_instead_of_json(answer: str, stage: str) -> str:
    if stage == "pairs":
        pairs = json.loads(answer)["pairs"]
        lines = [
            f"{i}. Genre: {p['genre']} Audience: {p['audience']}" for i, p in enumerate(pairs, 1)
        ]
        return "Here are some genre and audience pairs for this document:\n" + "\n".join(lines)
    if stage == "judge":
        verdict = json.loads(answer)
        return f"Score: {verdict['score']}/5. {verdict['analysis']}"
    return answer


def _wrong_count(answer: str, salt: int) -> str:
    pairs = json.loads(answer)["pairs"]
    if salt % 2 and len(pairs) > 1:
        pairs[-1] = dict(pairs[0])  # a duplicate: the right count, but not distinct pairs
    else:
        pairs = pairs[:-1]
    return json.dumps({"pairs": pairs}, ensure_ascii=False)


def _off_topic(profile: DocumentProfile) -> str:
    # Drop every word the source uses, so keyword coverage is exactly zero.
    kept = [w for w in OFF_TOPIC_TEXT.split() if not _shares_word(w, profile)]
    text = " ".join(kept) or " ".join(f"zq{i}x" for i in range(12))  # source used every word
    while len(text) < max(80, profile.chars // 2):
        text = f"{text} {text}"
    return text


def _shares_word(token: str, profile: DocumentProfile) -> bool:
    return any(w.lower() in profile.vocabulary for w in WORD_RE.findall(token))


# ---------------------------------------------------------------------------------------
# Requests


@dataclass
class ChatRequest:
    """What the handler needs from a chat completion request."""

    stage: str  # pairs | rewrite | judge | unknown
    doc_key: str
    base_key: str  # request identity without the attempt: aims transient faults
    full_key: str  # with the attempt: aims content faults (with the seed)
    document: str
    task: str
    seed: object
    max_tokens: int | None
    prompt_tokens: int


TASK_STAGES = (("TASK: propose", "pairs"), ("TASK: rewrite", "rewrite"), ("TASK: judge", "judge"))
PROPOSE_RE = re.compile(r"TASK: propose (\d+)")


def _text_of(content: object) -> str:
    # OpenAI clients may send content as a list of typed parts.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _stage_of(task: str) -> str:
    for prefix, stage in TASK_STAGES:
        if task.startswith(prefix):
            return stage
    return "unknown"


def _split_user_message(messages: list[dict]) -> tuple[str, str]:
    """(document, task) of a request laid out by `maga_tasks.method.prompts`.

    Finds the document block the way `prompts.document_from_messages` does; the task is
    what follows it in the same message.
    """
    for message in messages:
        content = _text_of(message.get("content"))
        start = content.find(DOCUMENT_OPEN)
        if start < 0:
            continue
        end = content.find(DOCUMENT_CLOSE, start + len(DOCUMENT_OPEN))
        if end >= 0:
            return content[start + len(DOCUMENT_OPEN) : end], content[end + len(DOCUMENT_CLOSE) :]
    # Not our layout: treat the last user message as both document and task.
    last = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1])
    text = _text_of(last.get("content"))
    return text, text


def _prompt_tokens(messages: list[dict], document: str, task: str) -> int:
    # Counted per part so the cached counts of the system message and document are
    # reused by all seven calls about a document; 4 tokens per message of chat template.
    total = 4 * len(messages)
    for message in messages:
        content = _text_of(message.get("content"))
        if document and task and content.endswith(task) and document in content:
            total += _count_prompt_part(document) + count_tokens(task) + 8
        else:
            total += _count_prompt_part(content)
    return total


def parse_chat_request(body: dict, request_id: str | None) -> ChatRequest:
    messages = body["messages"]
    document, task = _split_user_message(messages)
    stage = _stage_of(task)
    seed = body.get("seed")
    parts = request_id.split("/") if request_id else []
    if len(parts) == 4 and parts[1] in STAGES:
        doc_key, stage_key = parts[0], parts[1]
        base_key, full_key = "/".join(parts[:3]), request_id
    else:
        # No identity from the client: the document's hash names it, the task's hash
        # tells its calls apart, and the seed stands in for the attempt.
        doc_key = request_id or f"doc-{_digest(document):016x}"
        stage_key = stage
        base_key = f"{doc_key}/{stage}/{_digest(task):016x}"
        full_key = f"{base_key}/{seed}"
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return ChatRequest(
        stage=stage_key,
        doc_key=doc_key,
        base_key=base_key,
        full_key=full_key,
        document=document,
        task=task,
        seed=seed,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
        prompt_tokens=_prompt_tokens(messages, document, task),
    )


def _task_field(task: str, name: str) -> str:
    for line in task.splitlines():
        if line.startswith(name + ":"):
            return line[len(name) + 1 :].strip()
    return ""


def answer_for(req: ChatRequest, answer_stage: str, profile: DocumentProfile) -> str:
    """The model's honest answer, a pure function of document, task and seed."""
    if answer_stage == "pairs":
        match = PROPOSE_RE.match(req.task)
        n = int(match.group(1)) if match else 5
        return pairs_answer(profile, n, (req.document, req.seed))
    if answer_stage == "rewrite":
        genre, audience = _task_field(req.task, "Genre"), _task_field(req.task, "Audience")
        return make_rewrite(profile, genre, audience, (req.document, req.seed))
    if answer_stage == "judge":
        return judge_answer(profile, rewrite_in_judge_task(req.task))
    return "Understood. " + " ".join(profile.keywords[:10])


# ---------------------------------------------------------------------------------------
# Server state and handlers


@dataclass
class ServerState:
    """Configuration and counters of one server (the event loop is its only user)."""

    faults: tuple[Fault, ...]
    latency_s: float
    model: str
    api_key: str | None
    structured_outputs: bool
    die_after: int | None = None
    answered: int = 0
    fired_per_key: dict[tuple[int, str], int] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    # Prometheus counters are monotonic: /_reset leaves them alone.
    prompt_tokens_metric: int = 0
    generation_tokens_metric: int = 0
    success_metric: Counter = field(default_factory=Counter)
    running: int = 0

    def reset_stats(self) -> None:
        self.stats = {
            "requests_total": 0,
            "by_stage": Counter(),
            "by_doc": Counter(),
            "faults_fired": Counter(),
            "prompt_tokens_total": 0,
            "completion_tokens_total": 0,
        }

    def fires(self, index: int, fault: Fault, stage: str, aim_key: str, request_key: str) -> bool:
        """Whether `fault` fires now; `aim_key` picks the requests it is aimed at and
        `request_key` (no attempt) is what TIMES counts firings against."""
        if stage not in fault.stages or not fault.aims_at(aim_key):
            return False
        if fault.times != math.inf:
            counter_key = (index, request_key)
            fired = self.fired_per_key.get(counter_key, 0)
            if fired >= fault.times:
                return False
            self.fired_per_key[counter_key] = fired + 1
        self.stats["faults_fired"][fault.kind] += 1
        return True


STATE_KEY = web.AppKey("maga_test_llm_state", ServerState)


def _error(
    status: int, message: str, kind: str, param: str | None = None, headers=None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def _require_api_key(request: web.Request, handler):
    # Like vLLM's --api-key: only the OpenAI routes are guarded, not health or metrics.
    state = request.app[STATE_KEY]
    guarded = state.api_key and request.path.startswith("/v1/")
    if guarded and request.headers.get("Authorization") != f"Bearer {state.api_key}":
        return web.json_response({"error": "Unauthorized"}, status=401)
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def list_models(request: web.Request) -> web.Response:
    model = request.app[STATE_KEY].model
    card = {
        "id": model,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": MAX_MODEL_LEN,
    }
    return web.json_response({"object": "list", "data": [card]})


def _malformed(body: object) -> web.Response | None:
    """An error response for a body that is not a chat request at all, else None."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return _error(400, "messages must be a non-empty list", "BadRequestError", "messages")
    if not all(isinstance(m, dict) for m in messages):
        return _error(400, "each message must be an object", "BadRequestError", "messages")
    return None


def _refusal(body: dict, state: ServerState) -> web.Response | None:
    """An error response for a chat request vLLM would refuse, else None."""
    model = body.get("model")
    if model is not None and model != state.model:
        return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if body.get("stream"):
        return _error(
            400, "stream is not supported by the test server", "BadRequestError", "stream"
        )
    response_format = body.get("response_format")
    wants_schema = (
        isinstance(response_format, dict) and response_format.get("type") == "json_schema"
    )
    if wants_schema and not state.structured_outputs:
        return _error(
            400,
            "response_format json_schema is not supported: structured outputs are disabled",
            "BadRequestError",
            "response_format",
        )
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        return _error(400, "max_tokens must be an integer >= 1", "BadRequestError", "max_tokens")
    return None


def _count_request(state: ServerState, req: ChatRequest) -> None:
    stats = state.stats
    stats["requests_total"] += 1
    stats["by_stage"][req.stage] += 1
    stats["by_doc"][req.doc_key] += 1


async def _transient_fault(
    state: ServerState, req: ChatRequest, request: web.Request
) -> web.StreamResponse | None:
    """Fire the first transient fault aimed at this request, if any."""
    for index, fault in enumerate(state.faults):
        if fault.transient and state.fires(index, fault, req.stage, req.base_key, req.base_key):
            return await _fire_transient(fault, request)
    return None


async def _fire_transient(fault: Fault, request: web.Request) -> web.StreamResponse | None:
    if fault.kind == "http500":
        return _error(500, "injected internal server error", "InternalServerError")
    if fault.kind == "http429":
        return _error(429, "injected rate limit", "RateLimitError", headers={"Retry-After": "0"})
    if fault.kind == "disconnect":
        return _drop_connection(request)
    await asyncio.sleep(fault.hang_s)  # timeout: hang, then answer as usual
    return None


def _drop_connection(request: web.Request) -> web.StreamResponse:
    # Abort the socket so the client sees the connection end with no response at all.
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError  # nothing is left to answer on


def _content_fault(state: ServerState, req: ChatRequest, stage: str) -> Fault | None:
    """The first content fault that fires for this request, if any."""
    aim_key = f"{req.full_key}/{req.seed}"
    for index, fault in enumerate(state.faults):
        if fault.kind in CONTENT_KINDS and state.fires(index, fault, stage, aim_key, req.base_key):
            return fault
    return None


def _completion(state: ServerState, req: ChatRequest) -> dict:
    """The chat completion body for a request that gets an answer; counts its tokens."""
    profile = profile_document(req.document)
    answer_stage = _stage_of(req.task)
    content, cut = answer_for(req, answer_stage, profile), False
    fault = _content_fault(state, req, answer_stage)
    if fault is not None:
        salt = _digest(req.full_key, req.seed)
        content, cut = spoil(fault.kind, content, answer_stage, profile, salt)
    completion_tokens = count_tokens(content)
    if req.max_tokens is not None and completion_tokens > req.max_tokens:
        # What a real server does at the limit: stop mid-text and say so.
        content, completion_tokens, cut = (
            cut_to_tokens(content, req.max_tokens),
            req.max_tokens,
            True,
        )
    finish_reason = "length" if cut else "stop"
    state.stats["prompt_tokens_total"] += req.prompt_tokens
    state.stats["completion_tokens_total"] += completion_tokens
    state.prompt_tokens_metric += req.prompt_tokens
    state.generation_tokens_metric += completion_tokens
    state.success_metric[finish_reason] += 1
    return {
        "id": f"chatcmpl-{_digest(req.full_key, req.seed, state.answered):016x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": req.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": req.prompt_tokens + completion_tokens,
        },
    }


def _die(state: ServerState) -> None:
    print(
        f"test LLM server: die_after:{state.die_after} reached, exiting",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    if state.die_after is not None and state.answered >= state.die_after:
        _die(state)  # a request that races the last answer finds the process gone
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _error(400, "request body is not valid JSON", "BadRequestError")
    problem = _malformed(body)
    if problem is not None:
        return problem
    req = parse_chat_request(body, request.headers.get("X-Request-Id"))
    _count_request(state, req)  # refused requests count too: the client did send them
    refusal = _refusal(body, state)
    if refusal is not None:
        return await _answer(request, state, refusal)
    state.running += 1
    try:
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        failure = await _transient_fault(state, req, request)
        if failure is not None:
            return await _answer(request, state, failure)
        return await _answer(request, state, web.json_response(_completion(state, req)))
    finally:
        state.running -= 1


async def _answer(
    request: web.Request, state: ServerState, response: web.StreamResponse
) -> web.StreamResponse:
    state.answered += 1
    if state.die_after is not None and state.answered >= state.die_after:
        # Send this last answer completely before the process vanishes.
        await response.prepare(request)
        await response.write_eof()
        _die(state)
    return response


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats)


async def reset_stats(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset_stats()
    return web.json_response({"reset": True})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    label = f'model_name="{state.model}"'
    lines = [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{label}}} {state.prompt_tokens_metric}",
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{label}}} {state.generation_tokens_metric}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for reason in ("stop", "length"):
        count = state.success_metric.get(reason, 0)
        lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{label}}} {count}')
    lines += [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{label}}} {state.running}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def build_app(
    faults: Iterable[Fault] = (),
    latency_ms: float = 0,
    model: str = "maga-test",
    api_key: str | None = None,
    structured_outputs: bool = True,
) -> web.Application:
    """The test server as an aiohttp application (see the module docstring)."""
    faults = tuple(faults)
    die = [f.after for f in faults if f.kind == "die_after"]
    state = ServerState(
        faults=faults,
        latency_s=max(0.0, latency_ms) / 1000.0,
        model=model,
        api_key=api_key or None,
        structured_outputs=structured_outputs,
        die_after=min(die) if die else None,
    )
    state.reset_stats()
    # Judge requests carry a document and a rewrite; leave room beyond the 1 MiB default.
    app = web.Application(middlewares=[_require_api_key], client_max_size=64 * 1024**2)
    app[STATE_KEY] = state
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset_stats)
    app.router.add_get("/metrics", metrics)
    return app


async def _serve(host: str, port: int, app: web.Application) -> None:
    # Bind our own socket so port 0 works and the printed port is the real one.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port = sock.getsockname()[1]
    # handler_cancellation: a client that gives up cancels its request, as in vLLM.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Stop cleanly on Ctrl-C or a supervisor's SIGTERM (main thread only).
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host
    print(
        f"test LLM server listening on http://{shown_host}:{bound_port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _loop_factory():
    # uvloop roughly doubles aiohttp's request rate; fall back quietly without it.
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_server(host: str, port: int, **kwargs) -> None:
    """Serve `build_app(**kwargs)` on host:port until SIGINT/SIGTERM (blocking).

    Prints "test LLM server listening on http://HOST:PORT" to stderr once it accepts
    connections; port 0 picks a free port and the line shows the real one.
    """
    app = build_app(**kwargs)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(host, port, app))


def _fault_arg(spec: str) -> Fault:
    try:
        return parse_fault(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m maga_tasks.tools.test_server",
        description="Deterministic OpenAI-compatible LLM server for tests (no GPU).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--fault",
        type=_fault_arg,
        action="append",
        default=[],
        metavar="SPEC",
        help="KIND[:RATE[:TIMES]][:KEY=VALUE...], repeatable",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--model", default="maga-test")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-structured-outputs", action="store_true")
    args = parser.parse_args(argv)
    run_server(
        args.host,
        args.port,
        faults=args.fault,
        latency_ms=args.latency_ms,
        model=args.model,
        api_key=args.api_key,
        structured_outputs=not args.no_structured_outputs,
    )


if __name__ == "__main__":
    main()
