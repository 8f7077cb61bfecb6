"""The method's model calls: genre/audience pairs, rewrites, and the judge.

Each stage returns a result object, never raises for a document-level problem: a bad
answer becomes a reason the caller writes into the rejected output.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import quote

import orjson

from maga_tasks.errors import FleetRefused
from maga_tasks.llm.client import Completion, LLMClient
from maga_tasks.llm.failure import RequestFailed, RequestFailure
from maga_tasks.method.detectors import junk_description
from maga_tasks.method.prompts import (
    judge_json_schema,
    judge_messages,
    pair_choice_json_schema,
    pairs_json_schema,
    pairs_messages,
    rewrite_messages,
)
from maga_tasks.recipe import Recipe
from maga_tasks.reject_reasons import RejectReason


def derive_seed(doc_key: str, stage: str, pair_index: int, attempt: int) -> int:
    """Seed from (document, stage, pair, attempt): reruns ask for the same samples."""
    digest = hashlib.blake2b(f"{doc_key}|{stage}|{pair_index}|{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def request_id(doc_key: str, stage: str, pair_index: int) -> str:
    return f"{_quoted(doc_key)}/{stage}/{pair_index}"


@lru_cache(maxsize=1024)
def _quoted(doc_key: str) -> str:
    return quote(doc_key, safe="")  # the same key for the six or more requests of a document


@dataclass(frozen=True)
class Pair:
    genre: str
    audience: str


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion


@dataclass
class PairsResult:
    pairs: list[Pair] | None
    usage: Usage = field(default_factory=Usage)
    reject_reason: str | None = None
    detail: str = ""
    attempts: int = 0


class StructuredOutputSupport:
    """Remembers whether the servers accept `response_format` json_schema."""

    def __init__(self, mode: str):
        self.enabled = mode != "off"
        self.required = mode == "json_schema"


def falls_back_from_structured_outputs(
    failure: RequestFailure, structured: StructuredOutputSupport, *, required: bool
) -> bool:
    """Whether `failure` is the fleet refusing `response_format` while `structured` asked
    for it: then structured outputs go off for this fleet and the caller asks again
    without them (True), or, when the grammar is `required`, `FleetRefused` is raised (the
    same grammar goes with every document's request: the fleet's fault, not theirs)."""
    if not (structured.enabled and failure.refuses_structured_outputs):
        return False
    if required:
        raise FleetRefused(
            "the recipe needs structured outputs (pairs.structured_output: json_schema) and the"
            f" LLM fleet refuses them: {failure.detail[:200]}"
        )
    structured.enabled = False  # this fleet cannot; ask for plain JSON instead
    return True


# A catalogue choice cannot go without its grammar: the answer must be one of the entries.
_GRAMMAR_REQUIRED = StructuredOutputSupport("json_schema")


# The longest model answer parsed as JSON (pairs, a catalogue choice, a verdict): far
# above any honest one (a few pairs of a few hundred characters), far below what could
# cost memory or time. A longer answer is refused before any parsing.
MAX_JSON_ANSWER_CHARS = 256 * 1024


def read_json_object(text: str) -> tuple[dict | None, str]:
    """(the JSON object in an answer, "") tolerating code fences and chatter around it,
    or (None, why there is none). Bounded: no answer is parsed past MAX_JSON_ANSWER_CHARS
    or nested deeper than orjson's 1024 levels, and nothing raises."""
    if len(text) > MAX_JSON_ANSWER_CHARS:
        return None, f"answer of {len(text)} characters, over the {MAX_JSON_ANSWER_CHARS} a JSON answer may have"
    # The object among chatter: from the first "{" to the last "}" (string search, linear).
    start, end = text.find("{"), text.rfind("}")
    candidates = (text.strip(), text[start:end + 1]) if 0 <= start < end else (text.strip(),)
    for candidate in candidates:
        try:
            value = orjson.loads(candidate)  # fast; json below takes what it refuses (NaN, huge ints)
        except orjson.JSONDecodeError as error:
            if "depth" in str(error):
                return None, "answer nested deeper than 1024 levels"
            try:
                value = json.loads(candidate)
            except RecursionError:  # the C decoder stops cleanly at the interpreter's limit
                return None, "answer nested too deeply"
            except ValueError:
                continue
        if isinstance(value, dict):
            return value, ""
    return None, "no JSON object in the answer"


def parse_json_object(text: str) -> dict | None:
    """The JSON object in an answer (see `read_json_object`), or None."""
    return read_json_object(text)[0]


def validate_pairs(answer: dict | None, recipe: Recipe) -> tuple[list[Pair] | None, str, str]:
    """Exactly N distinct, non-empty pairs within the length bounds, else (None, reason, detail)."""
    if answer is None:
        return None, RejectReason.PAIRS_INVALID_JSON, "answer is not a JSON object"
    items = answer.get("pairs")
    if not isinstance(items, list):
        return None, RejectReason.PAIRS_INVALID_JSON, "no 'pairs' list"
    n = recipe.pairs_per_document
    if len(items) != n:
        return None, RejectReason.PAIRS_WRONG_COUNT, f"{len(items)} pairs, expected {n}"
    pairs, seen = [], set()
    g_min, g_max = recipe.pairs.genre_chars
    a_min, a_max = recipe.pairs.audience_chars
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return None, RejectReason.PAIRS_INVALID_JSON, f"pair {i} is not an object"
        genre, audience = item.get("genre"), item.get("audience")
        if not isinstance(genre, str) or not isinstance(audience, str) or not genre.strip() or not audience.strip():
            return None, RejectReason.PAIRS_EMPTY_FIELD, f"pair {i} lacks a genre or audience"
        genre, audience = genre.strip(), audience.strip()
        if not g_min <= len(genre) <= g_max:
            return None, RejectReason.PAIRS_LENGTH, f"pair {i} genre has {len(genre)} chars, bounds {g_min}-{g_max}"
        if not a_min <= len(audience) <= a_max:
            return (
                None, RejectReason.PAIRS_LENGTH, f"pair {i} audience has {len(audience)} chars, bounds {a_min}-{a_max}"
            )
        key = (" ".join(genre.lower().split()), " ".join(audience.lower().split()))
        if key in seen:
            return None, RejectReason.PAIRS_DUPLICATE, f"pair {i} repeats an earlier pair"
        seen.add(key)
        pairs.append(Pair(genre, audience))
    # Well-formed, but does each field describe a kind of text or reader?
    min_words = recipe.pairs.min_description_words
    for i, pair in enumerate(pairs if min_words else ()):
        junk = junk_description(pair.genre, "genre", min_words=min_words) or junk_description(
            pair.audience, "audience", min_words=min_words
        )
        if junk:
            return None, junk[0], f"pair {i}: {junk[1]}"
    return pairs, "", ""


async def generate_pairs(
    client: LLMClient, recipe: Recipe, doc_key: str, document: str, structured: StructuredOutputSupport
) -> PairsResult:
    if recipe.pairs.catalogue:
        return await choose_pairs(client, recipe, doc_key, document)
    messages = pairs_messages(recipe, document)
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "genre_audience_pairs", "schema": pairs_json_schema(recipe), "strict": True},
    }
    result = PairsResult(None)
    reason, detail = RejectReason.PAIRS_FAILED, ""
    for attempt in range(recipe.pairs.max_attempts):
        result.attempts = attempt + 1
        try:
            completion = await client.chat(
                messages,
                recipe.pairs.sampling,
                seed=derive_seed(doc_key, "pairs", -1, attempt),
                request_id=f"{request_id(doc_key, 'pairs', -1)}.{attempt}",
                affinity=doc_key,
                kind="pairs",
                response_format=schema if structured.enabled else None,
            )
        except RequestFailed as error:
            failure = error.failure
            if falls_back_from_structured_outputs(failure, structured, required=structured.required):
                continue
            result.usage.add(failure.prompt_tokens, failure.completion_tokens)
            reason, detail = RejectReason.PAIRS_REQUEST.with_cause(failure.reason), failure.detail[:300]
            break  # the client already spent this call's budget; a new seed cannot help
        result.usage.add(completion.prompt_tokens, completion.completion_tokens)
        if completion.finish_reason == "length":
            reason, detail = RejectReason.PAIRS_TRUNCATED, "answer hit max_tokens"
            continue
        answer, problem = read_json_object(completion.text)
        if answer is not None:
            pairs, reason, detail = validate_pairs(answer, recipe)
        else:
            pairs, reason, detail = None, RejectReason.PAIRS_INVALID_JSON, problem
        if pairs:
            result.pairs = pairs
            return result
    result.reject_reason, result.detail = reason, detail
    return result


async def choose_pairs(client: LLMClient, recipe: Recipe, doc_key: str, document: str) -> PairsResult:
    """The document's pairs chosen one per call from the recipe's catalogue, each call
    offered the genres and audiences not chosen yet (in an order of its own seed, so the
    model's liking for the first entries does not pick the same ones everywhere)."""
    catalogue = recipe.pairs.catalogue
    genres, audiences = list(catalogue.genres), list(catalogue.audiences)
    messages = pairs_messages(recipe, document)  # the same for every choice: one cached prefix
    result = PairsResult(None)
    chosen: list[Pair] = []
    for index in range(recipe.pairs_per_document):
        pair, reason, detail = None, RejectReason.PAIRS_FAILED, ""
        for attempt in range(recipe.pairs.max_attempts):
            result.attempts += 1
            seed = derive_seed(doc_key, "pairs", index, attempt)
            order = random.Random(seed)
            schema = pair_choice_json_schema(order.sample(genres, len(genres)), order.sample(audiences, len(audiences)))
            try:
                completion = await client.chat(
                    messages,
                    recipe.pairs.sampling,
                    seed=seed,
                    request_id=f"{request_id(doc_key, 'pairs', index)}.{attempt}",
                    affinity=doc_key,
                    kind="pairs",
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "pair_choice", "schema": schema, "strict": True},
                    },
                )
            except RequestFailed as error:
                failure = error.failure
                falls_back_from_structured_outputs(failure, _GRAMMAR_REQUIRED, required=True)  # raises on refusal
                result.usage.add(failure.prompt_tokens, failure.completion_tokens)
                result.reject_reason = RejectReason.PAIRS_REQUEST.with_cause(failure.reason)
                result.detail = failure.detail[:300]
                return result
            result.usage.add(completion.prompt_tokens, completion.completion_tokens)
            if completion.finish_reason == "length":
                reason, detail = RejectReason.PAIRS_TRUNCATED, f"choice {index} hit max_tokens"
                continue
            answer = parse_json_object(completion.text) or {}
            genre, audience = answer.get("genre"), answer.get("audience")
            if genre in genres and audience in audiences:
                pair = Pair(genre, audience)
                break
            # Only a server that ignores the grammar answers this.
            reason, detail = RejectReason.PAIRS_NOT_IN_CATALOGUE, f"choice {index}: {completion.text[:200]!r}"
        if pair is None:
            result.reject_reason, result.detail = reason, detail
            return result
        chosen.append(pair)
        genres.remove(pair.genre)
        audiences.remove(pair.audience)
    result.pairs = chosen
    return result


@dataclass
class RewriteResult:
    completion: Completion | None
    reject_reason: str | None = None
    detail: str = ""


async def rewrite(
    client: LLMClient, recipe: Recipe, doc_key: str, document: str, pair_index: int, pair: Pair, sample: int = 0
) -> RewriteResult:
    """One sample of the pair's rewrite (`sample` > 0: a further draw, its own seed)."""
    try:
        completion = await client.chat(
            rewrite_messages(recipe, document, pair.genre, pair.audience),
            recipe.rewrite.sampling,
            seed=derive_seed(doc_key, "rewrite", pair_index, sample),
            # The first sample keeps the id it always had (journals of earlier runs match).
            request_id=request_id(doc_key, "rewrite", pair_index) + (f".{sample}" if sample else ""),
            affinity=doc_key,
            kind="rewrite",
        )
    except RequestFailed as error:
        failure = error.failure
        return RewriteResult(None, RejectReason.REWRITE_REQUEST.with_cause(failure.reason), failure.detail[:300])
    return RewriteResult(completion)


@dataclass
class JudgeResult:
    score: int | None
    analysis: str = ""
    reject_reason: str | None = None
    # The genre question's answer: None when the recipe's judge does not ask it, or the
    # answer (without the grammar) leaves it out.
    genre_kept: bool | None = None


async def judge(
    client: LLMClient,
    recipe: Recipe,
    doc_key: str,
    document: str,
    rewritten: str,
    pair_index: int,
    structured: StructuredOutputSupport | None = None,
    genre: str = "",
    audience: str = "",
) -> JudgeResult:
    """Score limited consistency (1-5) of a rewrite against its source; where the recipe's
    judge names the genre, also whether the rewrite keeps it."""
    structured = structured or StructuredOutputSupport("auto")
    asks_genre = recipe.judge_asks_genre
    schema = {"type": "json_schema", "json_schema": {"name": "judge", "schema": judge_json_schema(asks_genre)}}
    for _ in range(2):  # a second try only when the fleet refuses structured outputs
        try:
            completion = await client.chat(
                judge_messages(recipe, document, rewritten, genre, audience),
                recipe.judge_sampling,
                seed=derive_seed(doc_key, "judge", pair_index, 0),
                request_id=request_id(doc_key, "judge", pair_index),
                affinity=doc_key,
                kind="judge",
                response_format=schema if structured.enabled else None,
            )
        except RequestFailed as error:
            # The judge goes without the grammar even where the pairs require it.
            if falls_back_from_structured_outputs(error.failure, structured, required=False):
                continue
            return JudgeResult(None, "", RejectReason.JUDGE_REQUEST.with_cause(error.failure.reason))
        answer = parse_json_object(completion.text) or {}
        score = answer.get("score")
        # (A JSON true is an int to Python, not a score.)
        if isinstance(score, int) and not isinstance(score, bool) and 1 <= score <= 5:
            analysis = answer.get("analysis")
            kept = answer.get("genre_kept") if asks_genre else None
            analysis = analysis[:800] if isinstance(analysis, str) else ""
            return JudgeResult(score, analysis, genre_kept=kept if isinstance(kept, bool) else None)
        return JudgeResult(None, "", RejectReason.JUDGE_INVALID_ANSWER)
    return JudgeResult(None, "", RejectReason.JUDGE_STRUCTURED_OUTPUTS_REFUSED)
