"""What an LLM endpoint's answer may be: the chat-completions schema with its bounds.

The fleet is half-trusted (a buggy server, an overloaded one, a proxy that rewrites
bodies), so an answer is read and parsed against a schema before any of it is used:

- size: the body is read in chunks and refused once it passes the request's bound
  (`answer_limit`: the envelope plus `max_tokens` x a bytes-per-token bound), so a 20 MB
  or endless answer costs at most that bound; an error body is read to `ERROR_BODY_BYTES`
  and goes out only through `redaction.clean_text`;
- depth: orjson refuses nesting deeper than 1024 levels (a JSONDecodeError, no
  recursion), and no other parser sees the envelope;
- types: `choices[0].message.content` a string or null, `finish_reason` a short word or
  null, `usage.prompt_tokens` / `completion_tokens` integers in [0, MAX_USAGE_TOKENS]
  (no bool, float, string or negative number).

A body that breaks the schema raises `MalformedAnswer` with a one-line reason; the
client makes it a failed attempt of the request, so it never reaches a row, the
checkpoint or the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp
import orjson

from maga_tasks.errors import MagaError

# No real request comes near this; 1e30 or 2**63 tokens is a lie that would overflow
# int64 columns and registry sums.
MAX_USAGE_TOKENS = 10_000_000
# Enough of an error body to tell what went wrong, never a 20 MB error page.
ERROR_BODY_BYTES = 4096
# How much of an error body goes into a message (after redaction).
ERROR_DETAIL_CHARS = 300
# /v1/models and /metrics answers: a model card list or a page of gauges, never megabytes.
SIDE_ROUTE_BYTES = 1024**2
# "stop", "length", "eos", "content_filter", "tool_calls"...: a short word. A server
# other than vLLM may say a natural end differently; cleaning judges the word itself.
_FINISH_REASON = re.compile(r"[A-Za-z0-9_.:-]{1,32}")


class MalformedAnswer(MagaError):
    """The body is not a chat completion within the bounds. `prompt_tokens` and
    `completion_tokens` are the usage it reported when that part was valid (the server
    did the work), else 0. Internal: the client counts it as a failed attempt and tries again."""

    retryable = True

    def __init__(self, reason: str, prompt_tokens: int = 0, completion_tokens: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def answer_limit(max_tokens: int, bytes_per_token: int, envelope_bytes: int) -> int:
    """The most bytes an honest answer to a request for `max_tokens` can take."""
    return envelope_bytes + max_tokens * bytes_per_token


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes (read no further: the connection
    is closed, so an endless answer ends here too)."""
    declared = response.content_length
    if declared is not None and declared > limit:
        response.close()
        return None
    body, complete = await _read_upto(response, limit + 1)
    return body if complete and len(body) <= limit else None


async def read_error_body(response: aiohttp.ClientResponse) -> bytes:
    """At most `ERROR_BODY_BYTES` of an error answer; the rest is not read."""
    return (await _read_upto(response, ERROR_BODY_BYTES))[0]


async def _read_upto(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body and whether that was all of it. A body cut short
    closes the connection: what is left of it is never read."""
    chunks, size = [], 0
    while size < limit and (chunk := await response.content.read(limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    complete = response.content.at_eof()
    if not complete:
        response.close()
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), complete


def parse_answer(raw: bytes) -> Answer:
    """The completion in a chat-completions body, or MalformedAnswer saying why not."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise MalformedAnswer(f"not JSON ({str(error)[:80]})") from None
    if not isinstance(body, dict):
        raise MalformedAnswer(f"body is {_kind(body)}, expected an object")
    prompt_tokens, completion_tokens = _usage(body.get("usage"))
    try:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise MalformedAnswer("choices is not a non-empty list")
        choice = choices[0]
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise MalformedAnswer("choices[0].message is not an object")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise MalformedAnswer(f"choices[0].message.content is {_kind(content)}, expected a string")
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None and not (
            isinstance(finish_reason, str) and _FINISH_REASON.fullmatch(finish_reason)
        ):
            raise MalformedAnswer(f"choices[0].finish_reason is {_kind(finish_reason)}, expected a short word")
    except MalformedAnswer as error:
        # The usage was valid: the server did the work, and its tokens count.
        error.prompt_tokens, error.completion_tokens = prompt_tokens, completion_tokens
        raise
    return Answer(content or "", finish_reason or "unknown", prompt_tokens, completion_tokens)


def _usage(usage: object) -> tuple[int, int]:
    """(prompt, completion) tokens; an answer without usage counts none."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        raise MalformedAnswer(f"usage is {_kind(usage)}, expected an object")
    return _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")


def _tokens(usage: dict, name: str) -> int:
    value = usage.get(name)
    if value is None:
        return 0
    # bool is an int subclass; a float (1e30, 3.0) is not a count.
    if type(value) is not int or not 0 <= value <= MAX_USAGE_TOKENS:
        shown = repr(value)[:40] if type(value) in (int, float) else _kind(value)
        raise MalformedAnswer(f"usage.{name} is {shown}, expected an integer in [0, {MAX_USAGE_TOKENS}]")
    return value


def _kind(value: object) -> str:
    """A value's JSON type for a message (never the value: it may be huge or hostile)."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
