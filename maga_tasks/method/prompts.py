"""Chat messages for the method's three calls: pairs, rewrite and judge.

Layout is prefix-cache friendly: the system message carries the instructions of all
three tasks (identical for every request of every document), the user message starts
with the document block, and only a short task line comes last. A server with automatic
prefix caching then encodes the instructions once and each document once.
"""

from __future__ import annotations

from functools import lru_cache

from maga_tasks.recipe import Recipe

DOCUMENT_OPEN = "SOURCE DOCUMENT\n<<<\n"
DOCUMENT_CLOSE = "\n>>>\n\n"

Messages = list[dict[str, str]]


def system_prompt(recipe: Recipe) -> str:
    return _formatted_system(recipe.prompts["system"], recipe.pairs_per_document)


@lru_cache(maxsize=16)
def _formatted_system(template: str, n_pairs: int) -> str:
    # The same long message for every request of a run: formatted once.
    return template.format(n_pairs=n_pairs)


def document_block(recipe: Recipe, document: str) -> str:
    """The source as the user message frames it (a recipe may frame it its own way)."""
    template = recipe.prompts.get("document")
    if template is None:
        return DOCUMENT_OPEN + document + DOCUMENT_CLOSE
    return template.replace("{document}", document)  # not format(): documents hold braces


def _messages(recipe: Recipe, document: str, task: str) -> Messages:
    return [
        {"role": "system", "content": system_prompt(recipe)},
        {"role": "user", "content": document_block(recipe, document) + task},
    ]


def pairs_messages(recipe: Recipe, document: str) -> Messages:
    task = recipe.prompts["pairs"].format(n_pairs=recipe.pairs_per_document)
    return _messages(recipe, document, task)


def rewrite_messages(recipe: Recipe, document: str, genre: str, audience: str) -> Messages:
    task = recipe.prompts["rewrite"].format(genre=genre, audience=audience)
    return _messages(recipe, document, task)


def judge_messages(recipe: Recipe, document: str, rewrite: str, genre: str = "", audience: str = "") -> Messages:
    task = recipe.prompts["judge"].format(rewrite=rewrite, genre=genre, audience=audience)
    return _messages(recipe, document, task)


def document_from_messages(messages: Messages) -> str | None:
    """The source document inside a request built here (used by the test server)."""
    for message in messages:
        content = message.get("content") or ""
        start = content.find(DOCUMENT_OPEN)
        end = content.find(DOCUMENT_CLOSE, start + len(DOCUMENT_OPEN)) if start >= 0 else -1
        if start >= 0 and end >= 0:
            return content[start + len(DOCUMENT_OPEN) : end]
    return None


def pairs_json_schema(recipe: Recipe) -> dict:
    """JSON schema for structured outputs of the pairs call."""
    n = recipe.pairs_per_document
    g_min, g_max = recipe.pairs.genre_chars
    a_min, a_max = recipe.pairs.audience_chars
    return {
        "type": "object",
        "properties": {
            "pairs": {
                "type": "array",
                "minItems": n,
                "maxItems": n,
                "items": {
                    "type": "object",
                    "properties": {
                        "genre": {"type": "string", "minLength": g_min, "maxLength": g_max},
                        "audience": {"type": "string", "minLength": a_min, "maxLength": a_max},
                    },
                    "required": ["genre", "audience"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["pairs"],
        "additionalProperties": False,
    }


def pair_choice_json_schema(genres: list[str], audiences: list[str]) -> dict:
    """JSON schema of one pair chosen from a recipe's catalogue: the grammar admits only
    the entries listed, so the answer is one of them word for word."""
    return {
        "type": "object",
        "properties": {"genre": {"enum": genres}, "audience": {"enum": audiences}},
        "required": ["genre", "audience"],
        "additionalProperties": False,
    }


JUDGE_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "analysis": {"type": "string", "maxLength": 800},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["analysis", "score"],
    "additionalProperties": False,
}


def judge_json_schema(asks_genre: bool) -> dict:
    """The judge's answer; with the genre question, `genre_kept` comes last, after the
    analysis that leads up to it."""
    if not asks_genre:
        return JUDGE_JSON_SCHEMA
    properties = {**JUDGE_JSON_SCHEMA["properties"], "genre_kept": {"type": "boolean"}}
    return {**JUDGE_JSON_SCHEMA, "properties": properties, "required": [*JUDGE_JSON_SCHEMA["required"], "genre_kept"]}
