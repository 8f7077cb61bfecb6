"""The one place that talks HTTP to the OpenAI-compatible LLM workers (vLLM).

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
import collections
import contextlib
import gc
import hashlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson
import uvloop

from maga_tasks.errors import EndpointsUnavailable, FleetRefused
from maga_tasks.llm.adaptive import AimdParams, ServerLoad, WindowController
from maga_tasks.llm.answer import (
    ERROR_DETAIL_CHARS,
    MalformedAnswer,
    answer_limit,
    parse_answer,
    read_bounded,
    read_error_body,
)
from maga_tasks.llm.failure import REFUSAL_STATUS, RETRYABLE_STATUS, RequestFailed, RequestFailure, is_redirect
from maga_tasks.llm.prometheus import parse_prometheus_text
from maga_tasks.recipe import Sampling
from maga_tasks.redaction import clean_text, redact_url, register_secret
from maga_tasks.settings import RunSettings

log = logging.getLogger(__name__)

# /v1/models and /metrics answers: a model card list or a page of gauges, never megabytes.
SIDE_ROUTE_BYTES = 1024**2


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    endpoint: str
    latency_s: float = 0.0  # the answered attempt's HTTP exchange, server queue included


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


class _EndpointDown(Exception):
    """Connection-level failure before the request reached the server."""


class _Disconnected(Exception):
    """The server dropped the connection while it held the request."""


class WindowGate:
    """Admits requests to one endpoint while fewer than `limit` hold a place; first come,
    first served, so a document's requests are not overtaken forever."""

    def __init__(self, limit: int):
        self.limit = limit
        self.admitted = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def enter(self) -> None:
        if self.admitted < self.limit and not self._waiters:
            self.admitted += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved with the place already counted for it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # granted just as it was cancelled: hand the place on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        self.admitted -= 1
        self._wake()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.admitted < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.admitted += 1
                waiter.set_result(None)

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)


@dataclass
class Endpoint:
    url: str
    label: str = ""  # the URL fit for messages and logs: user-info masked
    in_flight: int = 0
    consecutive_failures: int = 0
    healthy: bool = True
    prober: asyncio.Task | None = None
    # Why the endpoint is out for good (key, model, context length); None while usable.
    refused: str | None = None
    models_checked: bool = False
    # Requests it held when it last died (None while it lives): 1 names the culprit.
    died_holding: int | None = None
    # Adaptive concurrency only: its window and the gate that enforces it.
    controller: WindowController | None = None
    gate: WindowGate | None = None
    window_started: bool = False  # the first /metrics read has set the window


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


def serves_revision(root: object, revision: str) -> bool | None:
    """Whether the weights a `/v1/models` card reports as `root` (the path or hub id vLLM
    loaded) are `revision`: True, False, or None when the card cannot tell.

    The card has no revision field and a checksum file inside a worker's folder cannot be
    read from here, so the root's name is compared: it is `revision` when one of its path
    segments or its `@` suffix is `revision` (a folder named after the revision, the hub
    cache's `.../snapshots/<commit>`, `org/name@rev`); it is another one when it names a
    revision that differs (a `snapshots/<commit>` folder, an `@` suffix); a bare hub id
    or folder names none."""
    if not isinstance(root, str) or not root.strip("/"):
        return None
    path, _, suffix = root.rstrip("/").partition("@")
    segments = path.split("/")
    if revision in segments or suffix == revision:
        return True
    if suffix or any(segments[i] == "snapshots" for i in range(len(segments) - 1)):
        return False
    return None


class LLMClient:
    """Async client for a fleet of OpenAI-compatible chat completion endpoints."""

    def __init__(self, settings: RunSettings, model: str, *, model_revision: str | None = None):
        self.settings = settings
        self.model = settings.served_model or model
        # Checked against what each endpoint reports it loaded (`serves_revision`).
        self.model_revision = model_revision
        self.endpoints = [Endpoint(url, redact_url(url)) for url in settings.endpoints]
        if settings.adaptive_concurrency:
            params = AimdParams(ceiling=settings.max_concurrency, initial=settings.adaptive_initial_window)
            for endpoint in self.endpoints:
                endpoint.controller = WindowController(params)
                endpoint.gate = WindowGate(endpoint.controller.window)
        self._load_watch: asyncio.Task | None = None
        self.stats = ClientStats()
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._recovered = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        # When the fleet last answered a request (any kind), and which kinds it answered:
        # the evidence that turns a failing request into its document's problem.
        self._last_success = float("-inf")
        self._answered_kinds: set[str] = set()
        self._request_log = None

    async def __aenter__(self) -> "LLMClient":
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
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(
            total=self.settings.request_timeout_s, sock_connect=self.settings.connect_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, json_serialize=json.dumps,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        if self.settings.adaptive_concurrency:
            self._load_watch = asyncio.create_task(self._watch_load())
        if self.settings.request_log:
            self._request_log = open(self.settings.request_log, "a", encoding="utf-8")
        return self

    async def __aexit__(self, *exc) -> None:
        for endpoint in self.endpoints:
            if endpoint.prober:
                endpoint.prober.cancel()
        if self._load_watch is not None:
            self._load_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_watch
        if self._session:
            await self._session.close()
        if self._request_log is not None:
            self._request_log.close()

    # -- readiness -------------------------------------------------------------------

    async def probe(self, endpoint: Endpoint) -> bool:
        """Whether /health answers 200. A redirect is not followed: the endpoint is
        refused (it answers, so readiness can say why at once)."""
        try:
            async with self._session.get(
                f"{endpoint.url}/health", timeout=aiohttp.ClientTimeout(total=5), allow_redirects=False
            ) as response:
                if is_redirect(response.status):
                    endpoint.refused = _redirect_refusal(response)
                    return True
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _check_models(self, endpoint: Endpoint, min_context_tokens: int | None) -> None:
        """Does the endpoint serve our model, to our key, with room for the recipe?"""
        try:
            async with self._session.get(
                f"{endpoint.url}/v1/models", timeout=aiohttp.ClientTimeout(total=10), allow_redirects=False
            ) as response:
                status = response.status
                raw = await read_bounded(response, SIDE_ROUTE_BYTES) if status == 200 else b""
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return  # unreachable now: /health decides, the check runs again next time
        endpoint.models_checked = True
        if status in (401, 403):
            endpoint.refused = f"{REFUSAL_STATUS[status]} (http {status} on /v1/models)"
            return
        if status != 200 or raw is None:
            return  # a server without /v1/models (or with a card past any bound) cannot tell; the first request will
        try:
            # orjson: a card nested past 1024 levels is refused, never a RecursionError.
            models = {item["id"]: item for item in orjson.loads(raw)["data"] if isinstance(item, dict)}
        except (ValueError, KeyError, TypeError):
            return
        served = models.get(self.model)
        if served is None:
            served_names = clean_text(", ".join(sorted(map(str, models))) or "nothing", 300)
            endpoint.refused = (
                f"does not serve model {self.model!r} (it serves {served_names};"
                " set served_model / MAGA_SERVED_MODEL or the recipe's model)"
            )
            return
        length = served.get("max_model_len")
        if min_context_tokens and isinstance(length, int) and length < min_context_tokens:
            endpoint.refused = (
                f"serves {self.model!r} with max_model_len {length}, below the {min_context_tokens}"
                " tokens the recipe needs (context_budget_tokens + rewrite max_tokens)"
            )
            return
        if self.model_revision:
            root = served.get("root")
            same = serves_revision(root, self.model_revision)
            if same is False:
                endpoint.refused = (
                    f"serves {self.model!r} from {clean_text(repr(root), 300)}, not the recipe's model_revision {self.model_revision!r}"
                )
            elif same is None:
                log.warning(
                    "endpoint %s serves %r from %r, which names no revision: model_revision %r not checked",
                    endpoint.label, self.model, clean_text(repr(root), 300), self.model_revision,
                )

    def _refusal_error(self) -> FleetRefused:
        causes = "; ".join(f"{e.label} {e.refused}" for e in self.endpoints if e.refused)
        return FleetRefused(f"every LLM endpoint refuses this run: {causes}")

    async def wait_ready(self, timeout_s: float, *, min_context_tokens: int | None = None) -> list[str]:
        """Wait until at least one endpoint answers /health and serves our model to our
        key with room for `min_context_tokens`; returns the ready ones. Raises
        `FleetRefused` at once when every endpoint that answers refuses the run."""
        deadline = time.monotonic() + timeout_s
        while True:
            results = await asyncio.gather(*(self.probe(e) for e in self.endpoints))
            for endpoint, ok in zip(self.endpoints, results):
                if ok and not endpoint.models_checked:
                    await self._check_models(endpoint, min_context_tokens)
                endpoint.healthy = ok
                endpoint.consecutive_failures = 0 if ok else self.settings.endpoint_failure_threshold
            ready = [e.url for e, ok in zip(self.endpoints, results) if ok and not e.refused]
            if ready and self.settings.adaptive_concurrency:
                await asyncio.gather(*(
                    self._start_window(e) for e, ok in zip(self.endpoints, results)
                    if ok and not e.refused and not e.window_started
                ))
            if ready:
                for endpoint in self.endpoints:
                    if endpoint.refused:
                        log.error("endpoint %s left the rotation: it %s", endpoint.label, endpoint.refused)
                return ready
            if any(e.refused for e in self.endpoints) and all(e.refused or not ok for e, ok in zip(self.endpoints, results)):
                raise self._refusal_error()
            if time.monotonic() >= deadline:
                raise EndpointsUnavailable(
                    f"no LLM endpoint answered /health within {timeout_s:.0f}s: "
                    + ", ".join(e.label for e in self.endpoints)
                )
            await asyncio.sleep(min(1.0, self.settings.endpoint_probe_interval_s))

    # -- routing ---------------------------------------------------------------------

    def _usable(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.healthy and not e.refused]

    def _choose(self, affinity: str, tried: set[str]) -> Endpoint | None:
        """The first endpoint in the document's rendezvous order this request has not
        failed on yet (all of them again once it has failed on every one)."""
        usable = self._usable()
        fresh = [e for e in usable if e.url not in tried] or usable
        if not fresh:
            return None
        if len(fresh) == 1:
            return fresh[0]
        return max(fresh, key=lambda e: hashlib.blake2b(f"{affinity}|{e.url}".encode(), digest_size=8).digest())

    async def _wait_for(self, ready, what: str) -> None:
        """Wait up to `all_down_timeout_s` until `ready()`; raises TimeoutError."""
        deadline = time.monotonic() + self.settings.all_down_timeout_s
        while not ready():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(what)
            self._recovered.clear()
            try:
                await asyncio.wait_for(self._recovered.wait(), timeout=min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass

    async def _pick(self, affinity: str, tried: set[str]) -> Endpoint:
        endpoint = self._choose(affinity, tried)
        if endpoint is None:
            try:
                await self._wait_for(lambda: bool(self._usable()), "any endpoint")
            except TimeoutError:
                raise self._all_down() from None
            endpoint = self._choose(affinity, tried)
        return endpoint

    @contextlib.asynccontextmanager
    async def _slot(self, key: str, tried: set[str]):
        """An endpoint and a global slot for one attempt. With adaptive concurrency the
        request takes its place in the endpoint's window first, so one waiting for a full
        endpoint holds no slot another endpoint could use."""
        if not self.settings.adaptive_concurrency:
            async with self._semaphore:
                yield await self._pick(key, tried)
            return
        while True:
            endpoint = await self._pick(key, tried)
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

    def _all_down(self) -> EndpointsUnavailable:
        if all(e.refused for e in self.endpoints):
            return self._refusal_error()
        return EndpointsUnavailable(
            f"all LLM endpoints down for {self.settings.all_down_timeout_s:.0f}s: "
            + ", ".join(e.label for e in self.endpoints)
        )

    def _record_success(self, endpoint: Endpoint, kind: str) -> None:
        endpoint.consecutive_failures = 0
        self._last_success = time.monotonic()
        self._answered_kinds.add(kind)

    async def _died(self, endpoint: Endpoint) -> bool:
        """After a dropped connection: is the worker gone? The requests it held are
        counted once, before any await, so every request of one death reads the same."""
        if endpoint.died_holding is None:
            endpoint.died_holding = endpoint.in_flight
            if await self.probe(endpoint):
                endpoint.died_holding = None  # alive: a passing disconnect, retried as usual
                return False
            self._take_out(endpoint, f"after it died holding {endpoint.died_holding} request(s)")
        return True

    def _record_failure(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures += 1
        if endpoint.healthy and endpoint.consecutive_failures >= self.settings.endpoint_failure_threshold:
            self._take_out(endpoint, f"after {endpoint.consecutive_failures} failures")

    def _take_out(self, endpoint: Endpoint, why: str) -> None:
        endpoint.healthy = False
        log.warning("endpoint %s left the rotation %s", endpoint.label, why)
        if endpoint.prober is None or endpoint.prober.done():
            endpoint.prober = asyncio.create_task(self._probe_until_back(endpoint))

    async def _probe_until_back(self, endpoint: Endpoint) -> None:
        interval = self.settings.endpoint_probe_interval_s
        while not await self.probe(endpoint):
            await asyncio.sleep(interval)
            interval = min(interval * 2, 30.0)
        endpoint.healthy = True
        endpoint.consecutive_failures = 0
        endpoint.died_holding = None
        log.warning("endpoint %s is back in the rotation", endpoint.label)
        self._recovered.set()

    # -- requests --------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(0, ceiling)  # full jitter spreads a thundering herd
        return max(delay, retry_after or 0.0)

    def _budget_spent(self, kind: str, failure: RequestFailure, first_failure: float, used: list[int]) -> Exception:
        """The request's attempts are spent: its document's problem if the fleet answered
        since it first failed, else the fleet's (the shard fails, nothing is rejected)."""
        cause, detail = failure.cause, failure.detail
        if self._last_success > first_failure and (kind in self._answered_kinds or not 400 <= failure.status < 500):
            return RequestFailed(RequestFailure("retries_exhausted", f"{cause}: {detail}").costing(*used))
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
        limit = answer_limit(sampling.max_tokens, self.settings.answer_bytes_per_token, self.settings.answer_envelope_bytes)
        attempts = rate_limited = 0
        used = [0, 0]  # tokens of failed attempts that still cost the server
        tried: set[str] = set()
        deaths = 0  # deaths of workers that held this request
        first_failure: float | None = None
        while True:
            delay = 0.0
            async with self._slot(affinity or request_id, tried) as endpoint:
                endpoint.in_flight += 1
                try:
                    completion = await self._post(endpoint, payload, request_id, attempts + rate_limited + 1, used, limit)
                    self._record_success(endpoint, kind)
                    if endpoint.controller is not None:
                        endpoint.controller.observe(completion.latency_s, completion.completion_tokens)
                    if self._request_log is not None:
                        self._log_request(kind, body, completion)
                    completion.prompt_tokens += used[0]
                    completion.completion_tokens += used[1]
                    return completion
                except RequestFailed as error:
                    failure = error.failure
                    self.stats.failures[failure.reason] += 1
                    first_failure = first_failure or time.monotonic()
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
                            raise self._refusal_error() from None
                        continue
                    if failure.client_error and (
                        kind in self._answered_kinds or (response_format and failure.refuses_structured_outputs)
                    ):
                        raise RequestFailed(failure.costing(*used)) from None
                    if status == 429:
                        rate_limited += 1
                        spent = rate_limited >= self.settings.max_attempts_429
                    else:
                        attempts += 1
                        spent = attempts >= self.settings.max_attempts
                        tried.add(endpoint.url)
                    if failure.cause == "connection_error":
                        self._record_failure(endpoint)
                    if spent:
                        raise self._budget_spent(kind, failure, first_failure, used) from None
                    self.stats.retries += 1
                    delay = self._backoff(attempts or rate_limited, failure.retry_after)
                except _Disconnected:
                    self.stats.failures["disconnected"] += 1
                    first_failure = first_failure or time.monotonic()
                    attempts += 1
                    tried.add(endpoint.url)
                    if await self._died(endpoint):
                        deaths += 1
                        if endpoint.died_holding == 1 or deaths >= 2:
                            raise RequestFailed(RequestFailure(
                                "endpoint_died",
                                f"{endpoint.label} died while holding this request"
                                + (" alone" if endpoint.died_holding == 1 else f" ({deaths} deaths)"),
                            ).costing(*used)) from None
                    if attempts >= self.settings.max_attempts:
                        failure = RequestFailure("disconnected", endpoint.label, retryable=True)
                        raise self._budget_spent(kind, failure, first_failure, used) from None
                    self.stats.retries += 1
                    delay = self._backoff(attempts, None)
                finally:
                    endpoint.in_flight -= 1
            # Back off outside the semaphore so a sleeping retry does not hold a slot.
            await asyncio.sleep(delay)

    def _log_request(self, kind: str, body: dict, completion: Completion) -> None:
        record = {"kind": kind, "body": body, "prompt_tokens": completion.prompt_tokens,
                  "completion_tokens": completion.completion_tokens}
        self._request_log.write(json.dumps(record) + "\n")

    async def _post(
        self, endpoint: Endpoint, payload: bytes, request_id: str, attempt: int, used: list[int], limit: int
    ) -> Completion:
        headers = {"X-Request-Id": f"{request_id}/{attempt}"} if request_id else None
        self.stats.requests += 1
        started = time.monotonic()
        try:
            async with self._session.post(
                f"{endpoint.url}/v1/chat/completions", data=payload, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if is_redirect(status):
                    raise RequestFailed(RequestFailure(f"http_{status}", _redirect_refusal(response), status))
                if status != 200:
                    raw = await read_error_body(response)
                else:
                    raw = await read_bounded(response, limit)
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise RequestFailed(RequestFailure(
                "timeout", f"no answer within {self.settings.request_timeout_s}s", retryable=True
            )) from None
        except aiohttp.ClientConnectorError:
            raise RequestFailed(RequestFailure("connection_error", f"cannot connect to {endpoint.label}", retryable=True)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError, ConnectionError) as error:
            raise _Disconnected(type(error).__name__) from error
        except aiohttp.ClientError as error:
            raise RequestFailed(RequestFailure("client_error", type(error).__name__, retryable=True)) from None
        if status != 200:
            # An error page may echo our Authorization header or carry NUL bytes; its
            # detail goes into one-line errors, logs and rows: one line, redacted, bounded.
            detail = " ".join(clean_text(raw.decode("utf-8", "replace"), ERROR_DETAIL_CHARS).split())
            retryable = status in RETRYABLE_STATUS
            raise RequestFailed(RequestFailure(
                f"http_{status}", detail, status, retryable, retry_after if retryable else None
            ))
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
            self.stats.prompt_tokens += error.prompt_tokens
            self.stats.completion_tokens += error.completion_tokens
            raise RequestFailed(RequestFailure("bad_response", error.reason, retryable=True)) from None
        self.stats.prompt_tokens += answer.prompt_tokens
        self.stats.completion_tokens += answer.completion_tokens
        return Completion(
            answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens, attempt,
            endpoint.label, time.monotonic() - started,
        )

    # -- adaptive concurrency ----------------------------------------------------------

    async def _watch_load(self) -> None:
        """Read every usable endpoint's /metrics each `adaptive_interval_s` and move its
        window. Off the request path; a failing read never ends the watch."""
        interval = self.settings.adaptive_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.gather(*(self._read_load(e) for e in self._usable()))
            except Exception:  # a bug here must not stop the windows: say it, go on
                log.warning("reading the endpoints' load failed", exc_info=True)

    async def _fetch_load(self, endpoint: Endpoint) -> ServerLoad | None:
        """The endpoint's load from its /metrics; None when unreadable or without the
        queue gauges."""
        try:
            async with self._session.get(
                f"{endpoint.url}/metrics", timeout=aiohttp.ClientTimeout(total=min(5.0, 2 * self.settings.adaptive_interval_s)),
                allow_redirects=False,
            ) as response:
                text = await read_bounded(response, SIDE_ROUTE_BYTES) if response.status == 200 else None
                if text is not None:
                    return ServerLoad.from_metrics(parse_prometheus_text(text.decode("utf-8", "replace")))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        return None

    async def _start_window(self, endpoint: Endpoint) -> None:
        """The first read decides where the window starts (`WindowController.start`)."""
        endpoint.window_started = True
        window = endpoint.controller.start(await self._fetch_load(endpoint))
        endpoint.gate.set_limit(window)
        log.debug("endpoint %s: window starts at %d (%s)", endpoint.label, window, endpoint.controller.last_load)

    async def _read_load(self, endpoint: Endpoint) -> None:
        load = await self._fetch_load(endpoint)  # None: the controller goes by latency
        before = endpoint.controller.window
        window = endpoint.controller.update(load, time.monotonic())
        endpoint.gate.set_limit(window)
        if window != before:
            log.debug("endpoint %s: window %d -> %d (%s, %s)", endpoint.label, before, window,
                      endpoint.controller.signal, load)

    def load_report(self) -> list[dict]:
        """Per endpoint: its window, requests it holds or waits for, and the server's
        queue as last read (None when unknown); empty with a fixed cap."""
        report = []
        for endpoint in self.endpoints:
            if endpoint.controller is None:
                continue
            load = endpoint.controller.last_load
            report.append({
                "endpoint": endpoint.label,
                "window": endpoint.controller.window,
                "in_flight": endpoint.gate.admitted,
                "queued_here": endpoint.gate.waiting,
                "server_running": load.running if load else None,
                "server_waiting": load.waiting if load else None,
                "kv_cache_usage": load.kv_cache_usage if load else None,
                "signal": endpoint.controller.signal,
            })
        return report


def _redirect_refusal(response: aiohttp.ClientResponse) -> str:
    """Why a redirecting endpoint is refused. Its requests carry the key and the corpus:
    they go to the configured URL only, never where an answer points."""
    location = clean_text(redact_url(response.headers.get("Location", "?")), 200)
    return f"redirects (http {response.status} to {location}); redirects are not followed: configure the final URL"


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None
