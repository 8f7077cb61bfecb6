"""The one place that talks HTTP to the OpenAI-compatible LLM workers (vLLM).

`LLMClient` composes the parts of `maga_tasks.llm`: the endpoints' health (`endpoints`,
`routing`), their readiness (`readiness`), the adaptive windows (`windows`, `adaptive`),
one attempt of a request (`requests`) and why one failed (`failure`); the retry loop with
its budget and who owns a failure (below) is its own.

- Bounded concurrency: one semaphore caps the requests in flight across all endpoints
  (`max_concurrency`). Below it, with `adaptive_concurrency` (the default), each endpoint
  has a window of requests it may hold, moved by `llm.adaptive.WindowController` from the
  endpoint's `/metrics` (queue, KV cache, preemptions), read every `adaptive_interval_s`
  by a background task of the client, or from latency where metrics are missing; where
  it starts is decided by a first read in `wait_ready` (a share of the server's free
  slots where the server publishes them, `llm.adaptive`). A
  request takes its place in the window before a global slot, so requests waiting for a
  full endpoint never hold slots another endpoint could use.
- Affinity: the requests of one document go to the same endpoint (rendezvous hashing over
  the healthy ones) so that endpoint's prefix cache holds the document; a retry goes to
  the next endpoint in that order.
- Readiness that means ready: `wait_ready` checks `/health`, then `/v1/models` with the
  key: the model is served, its context length fits the recipe and, when the recipe names
  a `model_revision`, the weights it reports (`root`) are that revision where it can tell
  (`serves_revision`).
- Answers are half-trusted: each is read with a size bound and parsed against the
  chat-completions schema (`llm.answer`); one that breaks it is a failed attempt
  (`retryable_bad_response` with the reason), so no unchecked value reaches a row. Error
  bodies are read to a bound and pass `redaction.clean_text`; endpoint URLs in messages
  and logs pass `redact_url`.
- Who owns a failure is decided by the fleet, not by one answer:
  - 401/403/404 (key, model) and any redirect (never followed: a request carries the key
    and the corpus to the configured URL only) take the endpoint out for good; when every
    endpoint refuses, `FleetRefused` fails the shard before any document is rejected.
  - Every other failure (timeout, connection error, 5xx, bad body, and a 4xx of a request
    kind the fleet has not yet answered) spends the request's one budget of attempts
    (`max_attempts`; 429 has `max_attempts_429`), with backoff and full jitter. When the
    budget is spent, the request is a document-level `RequestFailed` only if the fleet
    answered some request since this one first failed; otherwise the fleet is sick and
    `EndpointsUnavailable` fails the shard (its checkpoint is kept, nothing is committed).
  - A 4xx for a kind of request the fleet has answered before is that document's problem
    (a prompt over the context length): rejected at once.
  - A worker that dies while it holds a request: a request it held alone is the cause and
    is rejected (`endpoint_died`) instead of being failed over, so one poison document
    cannot take the fleet down server by server; requests it held with others cannot be
    told from the cause, so they fail over, and one in flight at a second death is
    rejected too.
  - Connection failures also count against the endpoint, which leaves the rotation after a
    few in a row and is probed back via `/health`; when every endpoint stays down past
    `all_down_timeout_s` the client raises `EndpointsUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
import uvloop

from maga_tasks.errors import EndpointsUnavailable, FleetRefused
from maga_tasks.llm.adaptive import AimdParams, WindowController
from maga_tasks.llm.answer import answer_limit
from maga_tasks.llm.endpoints import Endpoint, Fleet
from maga_tasks.llm.failure import REFUSAL_STATUS, RequestFailed, RequestFailure, is_redirect
from maga_tasks.llm.readiness import Readiness
from maga_tasks.llm.requests import ClientStats, Completion, Disconnected, post_chat
from maga_tasks.llm.windows import LoadWatch, WindowGate, load_report
from maga_tasks.recipe import Sampling
from maga_tasks.redaction import register_secret
from maga_tasks.settings import RunSettings

# What callers import from here: the client's answers and its failure.
__all__ = ["ClientStats", "Completion", "Endpoint", "LLMClient", "RequestFailed", "RequestFailure", "run_client"]

log = logging.getLogger(__name__)

# vLLM's server (uvicorn) closes a connection idle for 5 s; aiohttp keeps one pooled for
# 15 s by default. Reusing a socket the server is closing that instant drops the request
# (13 retried "disconnected" attempts of 313 in one CI run): pooled connections retire first.
POOLED_CONNECTION_IDLE_S = 4.0


def run_client(coroutine):
    """Run a coroutine that drives the client, on a new uvloop event loop (at thousands of
    requests a second it costs the client about a tenth less CPU than asyncio's) and with
    fewer garbage collections (below)."""
    with _fewer_collections(), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


@contextlib.contextmanager
def _fewer_collections():
    # Hundreds of documents in flight keep thousands of young objects alive, which every
    # collection walks again; the modules and models loaded before walk in every full one.
    # Freezing what exists and collecting the youngest generation every 10,000
    # allocations instead of 700 took the collector from about 9% of the client's CPU to
    # 2-3% at zero latency. Restored afterwards.
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(10_000, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@dataclass
class _Spent:
    """What one request has spent over its attempts."""

    attempts: int = 0
    rate_limited: int = 0  # 429s, counted against `max_attempts_429` instead
    used: list[int] = field(default_factory=lambda: [0, 0])  # tokens of failed attempts that still cost the server
    tried: set[str] = field(default_factory=set)  # endpoints it failed on: the next attempt goes elsewhere
    deaths: int = 0  # deaths of workers that held it
    first_failure: float | None = None


class LLMClient:
    """Async client for a fleet of OpenAI-compatible chat completion endpoints."""

    def __init__(self, settings: RunSettings, model: str, *, model_revision: str | None = None):
        self.settings = settings
        self.model = settings.served_model or model
        # Checked against what each endpoint reports it loaded (`readiness.serves_revision`).
        self.model_revision = model_revision
        self.fleet = Fleet(settings)
        self.endpoints: list[Endpoint] = self.fleet.endpoints
        self._load_watch: LoadWatch | None = None
        if settings.adaptive_concurrency:
            params = AimdParams(ceiling=settings.max_concurrency, initial=settings.adaptive_initial_window,
                                slots=settings.server_slots)
            for endpoint in self.endpoints:
                endpoint.controller = WindowController(params)
                endpoint.gate = WindowGate(endpoint.controller.window)
            self._load_watch = LoadWatch(self.fleet)
        self._readiness = Readiness(
            self.fleet, self.model, model_revision, self._load_watch.start_window if self._load_watch else None
        )
        self.stats = ClientStats()
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._request_log = None

    async def __aenter__(self) -> LLMClient:
        headers = {"Content-Type": "application/json"}
        key = self.settings.resolved_api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
            register_secret(key)  # a server or proxy may echo it in any form: masked wherever it appears
            # aiohttp cannot send both a bearer key and a URL's user-info: every request
            # would fail as if the document were at fault. A configuration fault, said once.
            with_userinfo = [e.label for e in self.endpoints if "@" in e.url.split("://", 1)[-1].split("/", 1)[0]]
            if with_userinfo:
                raise FleetRefused(
                    f"endpoints {', '.join(with_userinfo)} carry user:password@ and an API key is configured too:"
                    " use one of them"
                )
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, enable_cleanup_closed=True, keepalive_timeout=POOLED_CONNECTION_IDLE_S
        )
        timeout = aiohttp.ClientTimeout(
            total=self.settings.request_timeout_s, sock_connect=self.settings.connect_timeout_s
        )
        self.fleet.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, json_serialize=json.dumps,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        if self._load_watch is not None:
            self._load_watch.start()
        if self.settings.request_log:
            self._request_log = open(self.settings.request_log, "a", encoding="utf-8")
        return self

    async def __aexit__(self, *exc) -> None:
        self.fleet.close()
        if self._load_watch is not None:
            await self._load_watch.stop()
        if self.fleet.session:
            await self.fleet.session.close()
        if self._request_log is not None:
            self._request_log.close()

    async def wait_ready(self, timeout_s: float, *, min_context_tokens: int | None = None) -> list[str]:
        """Wait until at least one endpoint answers /health and serves our model to our
        key with room for `min_context_tokens`; returns the ready ones. Raises
        `FleetRefused` at once when every endpoint that answers refuses the run."""
        return await self._readiness.wait_ready(timeout_s, min_context_tokens=min_context_tokens)

    def load_report(self) -> list[dict]:
        """Per endpoint: its window, requests it holds or waits for, and the server's
        queue as last read (None when unknown); empty with a fixed cap."""
        return load_report(self.endpoints)

    async def chat(
        self,
        messages: list[dict],
        sampling: Sampling,
        *,
        seed: int | None = None,
        request_id: str = "",
        affinity: str = "",
        response_format: dict | None = None,
        kind: str = "chat",
    ) -> Completion:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.frequency_penalty is not None:
            body["frequency_penalty"] = sampling.frequency_penalty
        if seed is not None:
            body["seed"] = seed
        if response_format:
            body["response_format"] = response_format
        payload = orjson.dumps(body)  # several times faster than json at thousands of requests/s
        settings = self.settings
        limit = answer_limit(sampling.max_tokens, settings.answer_bytes_per_token, settings.answer_envelope_bytes)
        spent = _Spent()
        while True:
            async with self._slot(affinity or request_id, spent.tried) as endpoint:
                endpoint.in_flight += 1
                try:
                    completion = await post_chat(
                        self.fleet.session, endpoint, payload, request_id=request_id,
                        attempt=spent.attempts + spent.rate_limited + 1, limit=limit, used=spent.used,
                        stats=self.stats, timeout_s=self.settings.request_timeout_s,
                    )
                    self.fleet.record_success(endpoint, kind)
                    if endpoint.controller is not None:
                        endpoint.controller.observe(completion.latency_s, completion.completion_tokens)
                    if self._request_log is not None:
                        self._log_request(kind, body, completion)
                    completion.prompt_tokens += spent.used[0]
                    completion.completion_tokens += spent.used[1]
                    return completion
                except RequestFailed as error:
                    delay = self._after_failure(endpoint, error.failure, spent, kind, bool(response_format))
                    if delay is None:
                        continue  # the endpoint refused the run: another one, at once
                except Disconnected:
                    delay = await self._after_disconnect(endpoint, spent, kind)
                finally:
                    endpoint.in_flight -= 1
            # Back off outside the semaphore so a sleeping retry does not hold a slot.
            await asyncio.sleep(delay)

    def _after_failure(
        self, endpoint: Endpoint, failure: RequestFailure, spent: _Spent, kind: str, structured: bool
    ) -> float | None:
        """After a failed attempt: the backoff before the next one, None to choose another
        endpoint at once (this one refuses the run); raises when the request is done."""
        self.stats.failures[failure.reason] += 1
        spent.first_failure = spent.first_failure or time.monotonic()
        if failure.cause == "timeout" and endpoint.controller is not None:
            endpoint.controller.observe_timeout()
        status = failure.status
        if failure.refuses_endpoint:
            endpoint.refused = (
                failure.detail if is_redirect(status)
                else f"{REFUSAL_STATUS[status]} (http {status}: {failure.detail[:120]})"
            )
            log.error("endpoint %s left the rotation: it %s", endpoint.label, endpoint.refused)
            if all(e.refused for e in self.endpoints):
                raise self.fleet.refusal_error() from None
            return None
        if failure.client_error and (
            kind in self.fleet.answered_kinds or (structured and failure.refuses_structured_outputs)
        ):
            raise RequestFailed(failure.costing(*spent.used)) from None
        if status == 429:
            spent.rate_limited += 1
            done = spent.rate_limited >= self.settings.max_attempts_429
        else:
            spent.attempts += 1
            done = spent.attempts >= self.settings.max_attempts
            spent.tried.add(endpoint.url)
        if failure.cause == "connection_error":
            self.fleet.record_failure(endpoint)
        if done:
            raise self._budget_spent(kind, failure, spent) from None
        self.stats.retries += 1
        return self._backoff(spent.attempts or spent.rate_limited, failure.retry_after)

    async def _after_disconnect(self, endpoint: Endpoint, spent: _Spent, kind: str) -> float:
        """After the server dropped the connection that held the request: the backoff
        before the next attempt; raises when the request is done."""
        self.stats.failures["disconnected"] += 1
        spent.first_failure = spent.first_failure or time.monotonic()
        spent.attempts += 1
        spent.tried.add(endpoint.url)
        if await self.fleet.died(endpoint):
            spent.deaths += 1
            if endpoint.died_holding == 1 or spent.deaths >= 2:
                raise RequestFailed(RequestFailure(
                    "endpoint_died",
                    f"{endpoint.label} died while holding this request"
                    + (" alone" if endpoint.died_holding == 1 else f" ({spent.deaths} deaths)"),
                ).costing(*spent.used)) from None
        if spent.attempts >= self.settings.max_attempts:
            failure = RequestFailure("disconnected", endpoint.label, retryable=True)
            raise self._budget_spent(kind, failure, spent) from None
        self.stats.retries += 1
        return self._backoff(spent.attempts, None)

    def _log_request(self, kind: str, body: dict, completion: Completion) -> None:
        record = {"kind": kind, "body": body, "prompt_tokens": completion.prompt_tokens,
                  "completion_tokens": completion.completion_tokens}
        self._request_log.write(json.dumps(record) + "\n")

    @contextlib.asynccontextmanager
    async def _slot(self, key: str, tried: set[str]):
        """An endpoint and a global slot for one attempt. With adaptive concurrency the
        request takes its place in the endpoint's window first, so one waiting for a full
        endpoint holds no slot another endpoint could use."""
        if not self.settings.adaptive_concurrency:
            async with self._semaphore:
                yield await self.fleet.pick(key, tried)
            return
        while True:
            endpoint = await self.fleet.pick(key, tried)
            await endpoint.gate.enter()
            try:
                endpoint.controller.note_in_flight(endpoint.gate.admitted)
                async with self._semaphore:
                    if endpoint.healthy and not endpoint.refused:
                        yield endpoint
                        return
            finally:
                endpoint.gate.leave()
            # It left the rotation while this request waited for a place: choose again.

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(0, ceiling)  # full jitter spreads a thundering herd
        return max(delay, retry_after or 0.0)

    def _budget_spent(self, kind: str, failure: RequestFailure, spent: _Spent) -> Exception:
        """The request's attempts are spent: its document's problem if the fleet answered
        since it first failed, else the fleet's (the shard fails, nothing is rejected)."""
        cause, detail = failure.cause, failure.detail
        answered_since = self.fleet.last_success > spent.first_failure
        if answered_since and (kind in self.fleet.answered_kinds or not 400 <= failure.status < 500):
            return RequestFailed(RequestFailure("retries_exhausted", f"{cause}: {detail}").costing(*spent.used))
        if cause == "timeout":
            return EndpointsUnavailable(
                f"requests time out after {self.settings.request_timeout_s:g} s on every endpoint: raise"
                f" request_timeout_s or lower concurrency ({', '.join(e.label for e in self.endpoints)})"
            )
        if 400 <= failure.status < 500:
            return FleetRefused(f"every LLM endpoint answers {cause} to {kind} requests: {detail[:200]}")
        return EndpointsUnavailable(
            f"every LLM endpoint fails {kind} requests ({cause}: {detail[:200]}) with no answer since"
        )
