"""One attempt of one chat request: the POST, its answer read to a bound and parsed
against the chat-completions schema (`llm.answer`), and every way it can fail made a
`RequestFailure` (or `Disconnected` when the server dropped a connection that held it).
Error bodies are read to a bound and pass `redaction.clean_text`."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from maga_tasks.errors import MagaError
from maga_tasks.llm.answer import ERROR_DETAIL_CHARS, MalformedAnswer, parse_answer, read_bounded, read_error_body
from maga_tasks.llm.endpoints import Endpoint, redirect_refusal
from maga_tasks.llm.failure import RETRYABLE_STATUS, RequestFailed, RequestFailure, is_redirect
from maga_tasks.redaction import clean_text


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    endpoint: str
    latency_s: float = 0.0  # the answered attempt's HTTP exchange, server queue included


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: Counter = field(default_factory=Counter)

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "failures": dict(self.failures),
        }


class Disconnected(MagaError):
    """The server dropped the connection while it held the request (internal: the client
    counts it and tries again)."""

    retryable = True


# How a connection that held the request ends without an answer.
_DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError, ConnectionError)


async def post_chat(
    session: aiohttp.ClientSession, endpoint: Endpoint, payload: bytes, *, request_id: str, attempt: int,
    limit: int, used: list[int], stats: ClientStats, timeout_s: float,
) -> Completion:
    """POST one attempt to `endpoint`; `used` gathers the tokens a malformed answer still
    cost, `limit` bounds the answer's bytes."""
    headers = {"X-Request-Id": f"{request_id}/{attempt}"} if request_id else None
    stats.requests += 1
    started = time.monotonic()
    try:
        async with session.post(
            f"{endpoint.url}/v1/chat/completions", data=payload, headers=headers, allow_redirects=False
        ) as response:
            status = response.status
            if is_redirect(status):
                raise RequestFailed(RequestFailure(f"http_{status}", redirect_refusal(response), status))
            if status != 200:
                raw = await read_error_body(response)
            else:
                raw = await read_bounded(response, limit)
            retry_after = _retry_after(response.headers.get("Retry-After"))
    except asyncio.TimeoutError:
        raise RequestFailed(RequestFailure("timeout", f"no answer within {timeout_s}s", retryable=True)) from None
    except aiohttp.ClientConnectorError:
        failure = RequestFailure("connection_error", f"cannot connect to {endpoint.label}", retryable=True)
        raise RequestFailed(failure) from None
    except _DROPPED as error:
        raise Disconnected(type(error).__name__) from error
    except aiohttp.ClientError as error:
        raise RequestFailed(RequestFailure("client_error", type(error).__name__, retryable=True)) from None
    if status != 200:
        # An error page may echo our Authorization header or carry NUL bytes; its
        # detail goes into one-line errors, logs and rows: one line, redacted, bounded.
        detail = " ".join(clean_text(raw.decode("utf-8", "replace"), ERROR_DETAIL_CHARS).split())
        retryable = status in RETRYABLE_STATUS
        raise RequestFailed(
            RequestFailure(f"http_{status}", detail, status, retryable, retry_after if retryable else None)
        )
    if raw is None:
        raise RequestFailed(RequestFailure(
            "bad_response",
            f"answer over {limit} bytes (answer_envelope_bytes + max_tokens x answer_bytes_per_token)",
            retryable=True,
        ))
    try:
        answer = parse_answer(raw)
    except MalformedAnswer as error:
        # The server did the work when its usage was valid: those tokens count.
        used[0] += error.prompt_tokens
        used[1] += error.completion_tokens
        stats.prompt_tokens += error.prompt_tokens
        stats.completion_tokens += error.completion_tokens
        raise RequestFailed(RequestFailure("bad_response", error.reason, retryable=True)) from None
    stats.prompt_tokens += answer.prompt_tokens
    stats.completion_tokens += answer.completion_tokens
    return Completion(
        answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens, attempt,
        endpoint.label, time.monotonic() - started,
    )


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None
