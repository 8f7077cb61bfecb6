"""The test LLM server's deterministic content: what an honest model answers.

It answers the three MAGA calls (pairs, rewrite, judge) without a model: every answer
is a pure function of the source document, the task and the seed, so runs are
reproducible and need no GPU. Answers are built to pass the pipeline's own checks:
pairs fit the recipe's length bounds, rewrites keep the source's keywords without
copying its 8-word runs, the judge scores word overlap. The hashing and token counting
the rest of the server shares live here too; what a request asks is read in
`chat_request`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from maga_tasks.tools.test_server.chat_request import ChatRequest

STAGES = ("pairs", "rewrite", "judge")


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
    # A few words of each, as a writer would name them (a copied description is an echo).
    shape = " ".join(_first_sentence(genre, 90).split()[:6]).rstrip(",;:")
    reader = " ".join(_first_sentence(audience, 70).split()[:6]).rstrip(",;:")
    subjects = ", ".join(keywords[:3]) or "its subject"
    if salt % 2:
        return f"Presented as {shape} for {reader}, it is about {subjects}."
    return f"Written for {reader}, this piece takes the form of {shape}. Its subjects: {subjects}."


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


def judge_answer(profile: DocumentProfile, rewrite: str | None, genre: str = "") -> str:
    """Score limited consistency by the share of the document's keywords kept; asked about
    a genre (a `Genre:` line), say it is kept when the rewrite names the genre's first
    word of four letters or more."""
    asked = {"genre_kept": genre_named(genre, rewrite or "")} if genre else {}
    if not rewrite or not rewrite.strip():
        analysis = "No rewritten text was given, so nothing derives from the document."
        return json.dumps({"analysis": analysis, "score": 1, **asked})
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
    return json.dumps({"analysis": analysis, "score": score, **asked})


def genre_named(genre: str, rewrite: str) -> bool:
    """The test server's genre rule: the genre's first word of 4+ letters is in the text."""
    word = next((w.lower() for w in WORD_RE.findall(genre) if len(w) >= 4), None)
    return word is not None and word in {w.lower() for w in WORD_RE.findall(rewrite)}


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
# The answer to a request


PROPOSE_RE = re.compile(r"TASK: propose (\d+)")


def _task_field(task: str, name: str) -> str:
    for line in task.splitlines():
        if line.startswith(name + ":"):
            return line[len(name) + 1 :].strip()
    return ""


def answer_for(req: ChatRequest, answer_stage: str, profile: DocumentProfile) -> str:
    """The model's honest answer, a pure function of document, task and seed."""
    if answer_stage == "pairs" and req.offered:
        genres, audiences = req.offered
        pick = _digest("choice", req.document, req.seed)
        return json.dumps({"genre": genres[pick % len(genres)], "audience": audiences[(pick // 7) % len(audiences)]})
    if answer_stage == "pairs":
        match = PROPOSE_RE.match(req.task)
        n = int(match.group(1)) if match else 5
        return pairs_answer(profile, n, (req.document, req.seed))
    if answer_stage == "rewrite":
        genre, audience = _task_field(req.task, "Genre"), _task_field(req.task, "Audience")
        return make_rewrite(profile, genre, audience, (req.document, req.seed))
    if answer_stage == "judge":
        return judge_answer(profile, rewrite_in_judge_task(req.task), _task_field(req.task, "Genre"))
    return "Understood. " + " ".join(profile.keywords[:10])
