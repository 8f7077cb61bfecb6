"""The test LLM server's HTTP side: the aiohttp app and its routes (its state is in
`state`, its process and command line in `serve`).

It speaks the slice of vLLM's HTTP API the pipeline uses (`/health`, `/v1/models`,
non-streaming `/v1/chat/completions`, `/metrics`), answering with `answers` and
refusing, failing or spoiling as the `faults` switches say. Besides the vLLM routes,
``GET /_stats`` returns request, fault and token counts (``POST /_reset`` clears them)
for tests and benchmarks to check against.

``--max-running N`` makes it behave like a saturated vLLM engine: at most N requests
are running (sleeping their latency and being answered) at once, the rest wait in a FIFO
queue. Queue time is part of the client's request time, so it counts toward the client's
timeout, and a client that gives up leaves the queue (counted as `cancelled_waiting`).
/metrics then reports vLLM's gauges `vllm:num_requests_running`,
`vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` (running / N: each running
request holds an equal share of the cache), and the counter `vllm:num_preemptions_total`,
which rises by one for each request that arrives while N or more already wait: the
point where an oversubscribed engine runs out of KV blocks and preempts. The request is
still queued as usual; only the signal is modelled. Without the option nothing waits,
the cache reads 0 and preemptions stay 0. `/_stats` adds `max_running` and
`max_waiting` (peaks since the last reset) and the cancellation counts. /metrics also
says N as the gauge `maga:max_num_seqs` (vLLM has no such gauge; `--no-slots-metric`
leaves it out, as a real vLLM would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable

from aiohttp import web

from maga_tasks.tools.test_server.answers import (
    _digest,
    answer_for,
    count_tokens,
    cut_to_tokens,
    profile_document,
)
from maga_tasks.tools.test_server.chat_request import (
    ChatRequest,
    _stage_of,
    parse_chat_request,
)
from maga_tasks.tools.test_server.faults import (
    CONTENT_KINDS,
    ENVELOPE_KINDS,
    HUGE_BODY_BYTES,
    Fault,
    huge_completion,
    spoil,
    spoil_envelope,
)
from maga_tasks.tools.test_server.state import MAX_MODEL_LEN, STATE_KEY, ServerState

# ---------------------------------------------------------------------------------------
# Handlers


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
        "root": request.app[STATE_KEY].model_root or model,
        "parent": None,
        "max_model_len": request.app[STATE_KEY].max_model_len,
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
    stats["by_request"][req.base_key] += 1


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
    if fault.kind == "crash":
        print(f"test LLM server: crash fault on {request.headers.get('X-Request-Id')}, exiting",
              file=sys.stderr, flush=True)
        os._exit(1)
    await asyncio.sleep(fault.hang_s)  # timeout: hang, then answer as usual
    return None


def _hostile_fault(state: ServerState, req: ChatRequest) -> Fault | None:
    """The first hostile fault aimed at this request, if any."""
    for index, fault in enumerate(state.faults):
        if fault.hostile and state.fires(index, fault, req.stage, req.base_key, req.base_key):
            return fault
    return None


async def _fire_hostile(fault: Fault, state: ServerState, req: ChatRequest, request: web.Request) -> web.StreamResponse:
    """The answer a broken server or a body-rewriting proxy sends instead of a completion."""
    if fault.kind in ENVELOPE_KINDS:
        return web.json_response(spoil_envelope(fault.kind, _completion(state, req)))
    if fault.kind == "huge_answer":
        return web.Response(body=huge_completion(_completion(state, req)), content_type="application/json")
    if fault.kind == "endless_answer":
        return await _endless_answer(request)
    if fault.kind == "echo_auth":
        echoed = "".join(f"{name}: {value}\n" for name, value in request.headers.items())
        return web.Response(status=401, text=f"401 Unauthorized. Your request headers were:\n{echoed}")
    if fault.kind == "nul_5xx":
        return web.Response(status=500, body=b"upstream \x00\x00 failed \x1b[31mred\x1b[0m \x00",
                            content_type="text/plain")
    if fault.kind == "huge_error":
        page = b"<html><body>" + b"Service Unavailable " * (HUGE_BODY_BYTES // 20) + b"</body></html>"
        return web.Response(status=503, body=page, content_type="text/html")
    raise AssertionError(fault.kind)


async def _endless_answer(request: web.Request) -> web.StreamResponse:
    # A completion that starts well and never ends: chunks until the client leaves.
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "')
    chunk = b"endless " * 131072  # 1 MiB
    with contextlib.suppress(ConnectionError, RuntimeError):  # the client closed it: done
        while True:
            await response.write(chunk)
    return response


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
    # deep_json is what a proxy sends, not a model: no max_tokens cut would leave it deep.
    capped = fault is None or fault.kind != "deep_json"
    if capped and req.max_tokens is not None and completion_tokens > req.max_tokens:
        # What a real server does at the limit: stop mid-text and say so.
        content, completion_tokens, cut = (
            cut_to_tokens(content, req.max_tokens),
            req.max_tokens,
            True,
        )
    finish_reason = "length" if cut else "eos" if fault is not None and fault.kind == "eos" else "stop"
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
    await state.start_running()
    try:
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        failure = await _transient_fault(state, req, request)
        if failure is not None:
            return await _answer(request, state, failure)
        hostile = _hostile_fault(state, req)
        if hostile is not None:
            return await _answer(request, state, await _fire_hostile(hostile, state, req, request))
        return await _answer(request, state, web.json_response(_completion(state, req)))
    except asyncio.CancelledError:
        state.stats["cancelled_running"] += 1
        raise
    finally:
        state.stop_running()


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
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{label}}} {len(state.queue)}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{label}}} {state.running / state.max_running if state.max_running else 0.0}",
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
        "# TYPE vllm:num_preemptions_total counter",
        f"vllm:num_preemptions_total{{{label}}} {state.preemptions_metric}",
    ]
    if state.max_running is not None and state.publish_slots:
        # vLLM publishes no gauge of its --max-num-seqs; this server says its capacity,
        # as a proxy that knows its worker's flag could (`llm.adaptive.SLOT_GAUGES`).
        lines += [
            "# HELP maga:max_num_seqs Requests the engine runs at once.",
            "# TYPE maga:max_num_seqs gauge",
            f"maga:max_num_seqs{{{label}}} {state.max_running}",
        ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def build_app(
    faults: Iterable[Fault] = (),
    latency_ms: float = 0,
    model: str = "maga-default",
    api_key: str | None = None,
    max_model_len: int = MAX_MODEL_LEN,
    structured_outputs: bool = True,
    model_root: str | None = None,
    max_running: int | None = None,
    publish_slots: bool = True,
) -> web.Application:
    """The test server as an aiohttp application (see the package docstring)."""
    faults = tuple(faults)
    die = [f.after for f in faults if f.kind == "die_after"]
    state = ServerState(
        faults=faults,
        latency_s=max(0.0, latency_ms) / 1000.0,
        model=model,
        api_key=api_key or None,
        max_model_len=max_model_len,
        model_root=model_root,
        structured_outputs=structured_outputs,
        die_after=min(die) if die else None,
        max_running=max_running,
        publish_slots=publish_slots,
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


