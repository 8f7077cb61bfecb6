"""Readiness that means ready: an endpoint counts once `/health` answers and `/v1/models`,
asked with the key, says it serves the run's model with a context length that fits the
recipe and, when the recipe names a `model_revision`, the weights it reports (`root`)
are that revision where it can tell (`serves_revision`). An endpoint that refuses leaves
the rotation for good, and when every endpoint that answers refuses, `FleetRefused`
fails the run before any document is asked for."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from maga_tasks.errors import EndpointsUnavailable
from maga_tasks.llm.answer import SIDE_ROUTE_BYTES, read_bounded
from maga_tasks.llm.endpoints import Endpoint, Fleet
from maga_tasks.llm.failure import REFUSAL_STATUS
from maga_tasks.redaction import clean_text

log = logging.getLogger(__name__)


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


class Readiness:
    """Checks the fleet's endpoints against the run's model (and revision)."""

    def __init__(self, fleet: Fleet, model: str, model_revision: str | None,
                 start_window: Callable[[Endpoint], Awaitable[None]] | None):
        self.fleet = fleet
        self.model = model
        self.model_revision = model_revision
        self._start_window = start_window  # adaptive concurrency only

    async def wait_ready(self, timeout_s: float, *, min_context_tokens: int | None = None) -> list[str]:
        """Wait until at least one endpoint answers /health and serves our model to our
        key with room for `min_context_tokens`; returns the ready ones. Raises
        `FleetRefused` at once when every endpoint that answers refuses the run."""
        fleet, endpoints = self.fleet, self.fleet.endpoints
        deadline = time.monotonic() + timeout_s
        while True:
            results = await asyncio.gather(*(fleet.probe(e) for e in endpoints))
            for endpoint, ok in zip(endpoints, results, strict=True):
                if ok and not endpoint.models_checked:
                    await self._check_models(endpoint, min_context_tokens)
                endpoint.healthy = ok
                endpoint.consecutive_failures = 0 if ok else fleet.settings.endpoint_failure_threshold
            ready = [e.url for e, ok in zip(endpoints, results, strict=True) if ok and not e.refused]
            if ready and self._start_window is not None:
                await asyncio.gather(*(
                    self._start_window(e) for e, ok in zip(endpoints, results, strict=True)
                    if ok and not e.refused and not e.window_started
                ))
            if ready:
                for endpoint in endpoints:
                    if endpoint.refused:
                        log.error("endpoint %s left the rotation: it %s", endpoint.label, endpoint.refused)
                return ready
            if any(e.refused for e in endpoints) and all(
                e.refused or not ok for e, ok in zip(endpoints, results, strict=True)
            ):
                raise fleet.refusal_error()
            if time.monotonic() >= deadline:
                raise EndpointsUnavailable(
                    f"no LLM endpoint answered /health within {timeout_s:.0f}s: "
                    + ", ".join(e.label for e in endpoints)
                )
            await asyncio.sleep(min(1.0, fleet.settings.endpoint_probe_interval_s))

    async def _check_models(self, endpoint: Endpoint, min_context_tokens: int | None) -> None:
        """Does the endpoint serve our model, to our key, with room for the recipe?"""
        try:
            async with self.fleet.session.get(
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
            self._check_revision(endpoint, served.get("root"))

    def _check_revision(self, endpoint: Endpoint, root: object) -> None:
        same = serves_revision(root, self.model_revision)
        if same is False:
            endpoint.refused = (
                f"serves {self.model!r} from {clean_text(repr(root), 300)},"
                f" not the recipe's model_revision {self.model_revision!r}"
            )
        elif same is None:
            log.warning(
                "endpoint %s serves %r from %r, which names no revision: model_revision %r not checked",
                endpoint.label, self.model, clean_text(repr(root), 300), self.model_revision,
            )
