"""The one place that talks HTTP to the OpenAI-compatible LLM workers (vLLM).

- Bounded concurrency: one semaphore caps the requests in flight across all endpoints.
- Affinity: the requests of one document go to the same endpoint (rendezvous hashing over
  the healthy ones) so that endpoint's prefix cache holds the document.
- Retries with exponential backoff and full jitter on timeouts, 429 and 5xx; a request
  that keeps failing on a healthy fleet becomes a `RequestFailed` (a document-level
  rejection). Connection failures are the endpoint's fault, not the request's: they take
  the endpoint out of rotation after a few in a row, a prober brings it back, and only
  when every endpoint stays down past `all_down_timeout_s` does the client raise
  `EndpointsUnavailable` (the shard fails; the scheduler retries it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from maga_tasks.errors import EndpointsUnavailable
from maga_tasks.recipe import Sampling
from maga_tasks.settings import RunSettings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    endpoint: str


class RequestFailed(Exception):
    """A single request could not be answered; the caller rejects its document."""

    def __init__(self, reason: str, detail: str = "", prompt_tokens: int = 0, completion_tokens: int = 0):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


class _EndpointDown(Exception):
    """Connection-level failure: counts against the endpoint, not the request."""


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    consecutive_failures: int = 0
    healthy: bool = True
    prober: asyncio.Task | None = None


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


class LLMClient:
    """Async client for a fleet of OpenAI-compatible chat completion endpoints."""

    def __init__(self, settings: RunSettings, model: str):
        self.settings = settings
        self.model = settings.served_model or model
        self.endpoints = [Endpoint(url) for url in settings.endpoints]
        self.stats = ClientStats()
        self._semaphore = asyncio.Semaphore(settings.max_concurrency)
        self._recovered = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "LLMClient":
        headers = {"Content-Type": "application/json"}
        key = self.settings.resolved_api_key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(
            total=self.settings.request_timeout_s, sock_connect=self.settings.connect_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, json_serialize=json.dumps
        )
        return self

    async def __aexit__(self, *exc) -> None:
        for endpoint in self.endpoints:
            if endpoint.prober:
                endpoint.prober.cancel()
        if self._session:
            await self._session.close()

    # -- readiness -------------------------------------------------------------------

    async def probe(self, endpoint: Endpoint) -> bool:
        try:
            async with self._session.get(
                f"{endpoint.url}/health", timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def wait_ready(self, timeout_s: float) -> list[str]:
        """Wait until at least one endpoint answers /health; returns the healthy ones."""
        deadline = time.monotonic() + timeout_s
        while True:
            results = await asyncio.gather(*(self.probe(e) for e in self.endpoints))
            for endpoint, ok in zip(self.endpoints, results):
                endpoint.healthy = ok
                endpoint.consecutive_failures = 0 if ok else self.settings.endpoint_failure_threshold
            ready = [e.url for e, ok in zip(self.endpoints, results) if ok]
            if ready:
                return ready
            if time.monotonic() >= deadline:
                raise EndpointsUnavailable(
                    f"no LLM endpoint answered /health within {timeout_s:.0f}s: "
                    + ", ".join(e.url for e in self.endpoints)
                )
            await asyncio.sleep(min(1.0, self.settings.endpoint_probe_interval_s))

    # -- routing ---------------------------------------------------------------------

    def _choose(self, affinity: str) -> Endpoint | None:
        healthy = [e for e in self.endpoints if e.healthy]
        if not healthy:
            return None
        if len(healthy) == 1:
            return healthy[0]
        return max(healthy, key=lambda e: hashlib.blake2b(f"{affinity}|{e.url}".encode(), digest_size=8).digest())

    async def _pick(self, affinity: str) -> Endpoint:
        endpoint = self._choose(affinity)
        if endpoint:
            return endpoint
        deadline = time.monotonic() + self.settings.all_down_timeout_s
        while endpoint is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EndpointsUnavailable(
                    f"all LLM endpoints down for {self.settings.all_down_timeout_s:.0f}s: "
                    + ", ".join(e.url for e in self.endpoints)
                )
            self._recovered.clear()
            try:
                await asyncio.wait_for(self._recovered.wait(), timeout=min(remaining, 1.0))
            except asyncio.TimeoutError:
                pass
            endpoint = self._choose(affinity)
        return endpoint

    def _record_success(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures = 0

    def _record_failure(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures += 1
        if endpoint.healthy and endpoint.consecutive_failures >= self.settings.endpoint_failure_threshold:
            endpoint.healthy = False
            log.warning("endpoint %s left the rotation after %d failures", endpoint.url, endpoint.consecutive_failures)
            if endpoint.prober is None or endpoint.prober.done():
                endpoint.prober = asyncio.create_task(self._probe_until_back(endpoint))

    async def _probe_until_back(self, endpoint: Endpoint) -> None:
        interval = self.settings.endpoint_probe_interval_s
        while not await self.probe(endpoint):
            await asyncio.sleep(interval)
            interval = min(interval * 2, 30.0)
        endpoint.healthy = True
        endpoint.consecutive_failures = 0
        log.warning("endpoint %s is back in the rotation", endpoint.url)
        self._recovered.set()

    # -- requests --------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
        delay = random.uniform(0, ceiling)  # full jitter spreads a thundering herd
        return max(delay, retry_after or 0.0)

    async def chat(
        self,
        messages: list[dict],
        sampling: Sampling,
        *,
        seed: int | None = None,
        request_id: str = "",
        affinity: str = "",
        response_format: dict | None = None,
    ) -> Completion:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if seed is not None:
            body["seed"] = seed
        if response_format:
            body["response_format"] = response_format
        payload = json.dumps(body)
        attempt = 0
        while True:
            delay = 0.0
            async with self._semaphore:
                endpoint = await self._pick(affinity or request_id)
                endpoint.in_flight += 1
                try:
                    return await self._post(endpoint, payload, request_id, attempt + 1)
                except _EndpointDown as error:
                    self.stats.failures[str(error)] += 1
                    self._record_failure(endpoint)
                    delay = self.settings.backoff_base_s / 10
                except RequestFailed as error:
                    self.stats.failures[error.reason] += 1
                    if not error.reason.startswith("retryable_"):
                        raise
                    self._record_failure(endpoint)
                    attempt += 1
                    if attempt >= self.settings.max_attempts:
                        raise RequestFailed(
                            "retries_exhausted", f"{error.reason.removeprefix('retryable_')}: {error.detail}"
                        ) from None
                    self.stats.retries += 1
                    delay = self._backoff(attempt, getattr(error, "retry_after", None))
                finally:
                    endpoint.in_flight -= 1
            # Back off outside the semaphore so a sleeping retry does not hold a slot.
            await asyncio.sleep(delay)

    async def _post(self, endpoint: Endpoint, payload: str, request_id: str, attempt: int) -> Completion:
        headers = {"X-Request-Id": f"{request_id}/{attempt}"} if request_id else None
        self.stats.requests += 1
        try:
            async with self._session.post(
                f"{endpoint.url}/v1/chat/completions", data=payload, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise RequestFailed("retryable_timeout", f"no answer within {self.settings.request_timeout_s}s") from None
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as error:
            raise _EndpointDown("connection_error") from error
        except aiohttp.ClientError as error:
            raise RequestFailed("retryable_client_error", type(error).__name__) from None
        if status != 200:
            detail = raw[:300].decode("utf-8", "replace")
            if status in RETRYABLE_STATUS:
                failure = RequestFailed(f"retryable_http_{status}", detail)
                failure.retry_after = retry_after
                raise failure
            raise RequestFailed(f"http_{status}", detail)
        self._record_success(endpoint)
        try:
            answer = json.loads(raw)
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
            finish_reason = choice.get("finish_reason") or "unknown"
            usage = answer.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RequestFailed("retryable_bad_response", raw[:200].decode("utf-8", "replace")) from None
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        return Completion(text, finish_reason, prompt_tokens, completion_tokens, attempt, endpoint.url)


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None
