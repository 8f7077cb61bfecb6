"""The test LLM server's HTTP side: the aiohttp app, its state and the command line.

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

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp import web

from maga_tasks.tools.test_server.answers import (
    ChatRequest,
    _digest,
    _stage_of,
    answer_for,
    count_tokens,
    cut_to_tokens,
    parse_chat_request,
    profile_document,
)
from maga_tasks.tools.test_server.faults import (
    CONTENT_KINDS,
    ENVELOPE_KINDS,
    HUGE_BODY_BYTES,
    Fault,
    fault_fires,
    huge_completion,
    parse_fault,
    spoil,
    spoil_envelope,
)

MAX_MODEL_LEN = 8192


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
    max_model_len: int = MAX_MODEL_LEN
    model_root: str | None = None  # what /v1/models reports as `root` (default: the model name)
    answered: int = 0
    fired_per_key: dict[tuple[int, str], int] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    # Prometheus counters are monotonic: /_reset leaves them alone.
    prompt_tokens_metric: int = 0
    generation_tokens_metric: int = 0
    success_metric: Counter = field(default_factory=Counter)
    running: int = 0
    max_running: int | None = None  # capacity: more requests than this wait in `queue`
    queue: deque = field(default_factory=deque)  # futures of waiting requests, FIFO
    preemptions_metric: int = 0
    publish_slots: bool = True  # /metrics says max_running as `maga:max_num_seqs`

    def reset_stats(self) -> None:
        self.stats = {
            "requests_total": 0,
            "by_stage": Counter(),
            "by_doc": Counter(),
            "by_request": Counter(),  # per request (document, stage, pair), its retries together
            "faults_fired": Counter(),
            "prompt_tokens_total": 0,
            "completion_tokens_total": 0,
            "max_running": self.running,
            "max_waiting": len(self.queue),
            "cancelled_waiting": 0,
            "cancelled_running": 0,
        }

    async def start_running(self) -> None:
        """Wait for a place among the running requests (FIFO behind the waiting ones)."""
        if self.max_running is not None and (self.running >= self.max_running or self.queue):
            if len(self.queue) >= self.max_running:
                self.preemptions_metric += 1
            waiter = asyncio.get_running_loop().create_future()
            self.queue.append(waiter)
            self.stats["max_waiting"] = max(self.stats["max_waiting"], len(self.queue))
            try:
                await waiter  # resolved by `stop_running`, the place already counted
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.stop_running()  # given a place just as the client left: pass it on
                else:
                    with contextlib.suppress(ValueError):  # `stop_running` may have dropped it
                        self.queue.remove(waiter)
                self.stats["cancelled_waiting"] += 1
                raise
        else:
            self.running += 1
        self.stats["max_running"] = max(self.stats["max_running"], self.running)

    def stop_running(self) -> None:
        """Leave the running requests; the first waiting one takes the place."""
        while self.queue:
            waiter = self.queue.popleft()
            if not waiter.done():  # a cancelled one is a client that left
                waiter.set_result(None)  # `running` stays: the place changes hands
                return
        self.running -= 1

    def fires(self, index: int, fault: Fault, stage: str, aim_key: str, request_key: str) -> bool:
        """Whether `fault` fires now (see `fault_fires`); a firing is counted in the stats."""
        if not fault_fires(self.fired_per_key, index, fault, stage, aim_key, request_key):
            return False
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
        print(f"test LLM server: crash fault on {request.headers.get('X-Request-Id')}, exiting", file=sys.stderr, flush=True)
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
        return web.Response(status=500, body=b"upstream \x00\x00 failed \x1b[31mred\x1b[0m \x00", content_type="text/plain")
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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


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
    parser.add_argument("--model", default="maga-default")
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN, help="context length /v1/models reports")
    parser.add_argument("--model-root", default=None, help="weights path or hub id /v1/models reports as root")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-structured-outputs", action="store_true")
    parser.add_argument("--max-running", type=_positive_int, default=None, metavar="N",
                        help="run at most N requests at once, queue the rest (like a saturated vLLM)")
    parser.add_argument("--no-slots-metric", action="store_true",
                        help="with --max-running: do not publish N in /metrics (vLLM publishes no such gauge)")
    args = parser.parse_args(argv)
    run_server(
        args.host,
        args.port,
        faults=args.fault,
        latency_ms=args.latency_ms,
        model=args.model,
        api_key=args.api_key,
        max_model_len=args.max_model_len,
        model_root=args.model_root,
        structured_outputs=not args.no_structured_outputs,
        max_running=args.max_running,
        publish_slots=not args.no_slots_metric,
    )
