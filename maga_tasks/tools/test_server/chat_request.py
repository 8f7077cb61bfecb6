"""What a chat request to the test LLM server asks: its stage, its document and task (read
from the prompt layout of `maga_tasks.method.prompts`), its identity for aiming faults,
its prompt tokens and, for a catalogue recipe, the entries its schema admits.

Requests are identified by the client's ``X-Request-Id: DOC/STAGE/PAIR/ATTEMPT`` (four
'/'-separated fields, STAGE one of pairs/rewrite/judge, ATTEMPT the transport attempt);
without it the stage comes from the task's first line and hashes of the document and
task stand in for the key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from maga_tasks.method.prompts import DOCUMENT_CLOSE, DOCUMENT_OPEN
from maga_tasks.tools.test_server.answers import STAGES, _digest, count_tokens

# Prompt parts repeat: every request of a document carries the same system message and
# document text, so their counts are worth remembering (answers are not).
_count_prompt_part = functools.lru_cache(maxsize=2048)(count_tokens)


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
    # The genre and audience entries a pair-choice schema admits (a catalogue recipe).
    offered: tuple[list[str], list[str]] | None = None


TASK_STAGES = (("TASK: propose", "pairs"), ("TASK: rewrite", "rewrite"), ("TASK: judge", "judge"))


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


def _offered_choices(response_format: object) -> tuple[list[str], list[str]] | None:
    """(genres, audiences) of a json_schema that admits only listed entries, else None."""
    try:
        properties = response_format["json_schema"]["schema"]["properties"]
        genres, audiences = properties["genre"]["enum"], properties["audience"]["enum"]
    except (KeyError, TypeError):
        return None
    return (genres, audiences) if genres and audiences else None


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
        offered=_offered_choices(body.get("response_format")),
    )
