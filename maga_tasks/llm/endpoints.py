"""The fleet of LLM endpoints as the client sees it: which are usable, which are out for
good (refused: key, model, redirect) and which are down and probed back via `/health`.

Connection failures count against an endpoint, which leaves the rotation after
`endpoint_failure_threshold` in a row; a worker that died while it held requests leaves at
once and remembers how many it held (1 names the culprit). When no endpoint is usable a
request waits up to `all_down_timeout_s` for one to come back, then the shard fails with
`EndpointsUnavailable` (or `FleetRefused` when every endpoint refuses the run)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

from maga_tasks.errors import EndpointsUnavailable, FleetRefused
from maga_tasks.llm.adaptive import WindowController
from maga_tasks.llm.failure import is_redirect
from maga_tasks.llm.routing import rendezvous_choice
from maga_tasks.llm.windows import WindowGate
from maga_tasks.redaction import clean_text, redact_url
from maga_tasks.settings import RunSettings

log = logging.getLogger(__name__)

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


def redirect_refusal(response: aiohttp.ClientResponse) -> str:
    """Why a redirecting endpoint is refused. Its requests carry the key and the corpus:
    they go to the configured URL only, never where an answer points."""
    location = clean_text(redact_url(response.headers.get("Location", "?")), 200)
    return f"redirects (http {response.status} to {location}); redirects are not followed: configure the final URL"


class Fleet:
    """The endpoints' health and the evidence that the fleet answers (`last_success`,
    `answered_kinds`: what turns a failing request into its document's problem)."""

    def __init__(self, settings: RunSettings):
        self.settings = settings
        self.endpoints = [Endpoint(url, redact_url(url)) for url in settings.endpoints]
        self.session: aiohttp.ClientSession | None = None  # set while the client is open
        self.last_success = float("-inf")
        self.answered_kinds: set[str] = set()
        self._recovered = asyncio.Event()

    def close(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.prober:
                endpoint.prober.cancel()

    async def probe(self, endpoint: Endpoint) -> bool:
        """Whether /health answers 200. A redirect is not followed: the endpoint is
        refused (it answers, so readiness can say why at once)."""
        try:
            async with self.session.get(
                f"{endpoint.url}/health", timeout=aiohttp.ClientTimeout(total=5), allow_redirects=False
            ) as response:
                if is_redirect(response.status):
                    endpoint.refused = redirect_refusal(response)
                    return True
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    def usable(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.healthy and not e.refused]

    async def pick(self, affinity: str, tried: set[str]) -> Endpoint:
        """The endpoint for an attempt (`routing.rendezvous_choice`), waiting up to
        `all_down_timeout_s` for one when none is usable."""
        endpoint = rendezvous_choice(self.usable(), affinity, tried)
        if endpoint is None:
            try:
                await self._wait_for(lambda: bool(self.usable()), "any endpoint")
            except TimeoutError:
                raise self.all_down() from None
            endpoint = rendezvous_choice(self.usable(), affinity, tried)
        return endpoint

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

    def refusal_error(self) -> FleetRefused:
        causes = "; ".join(f"{e.label} {e.refused}" for e in self.endpoints if e.refused)
        return FleetRefused(f"every LLM endpoint refuses this run: {causes}")

    def all_down(self) -> EndpointsUnavailable:
        if all(e.refused for e in self.endpoints):
            return self.refusal_error()
        return EndpointsUnavailable(
            f"all LLM endpoints down for {self.settings.all_down_timeout_s:.0f}s: "
            + ", ".join(e.label for e in self.endpoints)
        )

    def record_success(self, endpoint: Endpoint, kind: str) -> None:
        endpoint.consecutive_failures = 0
        self.last_success = time.monotonic()
        self.answered_kinds.add(kind)

    def record_failure(self, endpoint: Endpoint) -> None:
        endpoint.consecutive_failures += 1
        if endpoint.healthy and endpoint.consecutive_failures >= self.settings.endpoint_failure_threshold:
            self.take_out(endpoint, f"after {endpoint.consecutive_failures} failures")

    async def died(self, endpoint: Endpoint) -> bool:
        """After a dropped connection: is the worker gone? The requests it held are
        counted once, before any await, so every request of one death reads the same."""
        if endpoint.died_holding is None:
            endpoint.died_holding = endpoint.in_flight
            if await self.probe(endpoint):
                endpoint.died_holding = None  # alive: a passing disconnect, retried as usual
                return False
            self.take_out(endpoint, f"after it died holding {endpoint.died_holding} request(s)")
        return True

    def take_out(self, endpoint: Endpoint, why: str) -> None:
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
