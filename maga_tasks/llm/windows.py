"""Adaptive concurrency's plumbing: each endpoint's window of requests (`WindowGate`),
moved by its `llm.adaptive.WindowController` from the endpoint's `/metrics` (queue, KV
cache, preemptions) read every `adaptive_interval_s` off the request path (`LoadWatch`),
or from latency where metrics are missing. The first read, in `wait_ready`, decides where
a window starts (a share of the server's free slots where it publishes them)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import aiohttp

from maga_tasks.llm.adaptive import ServerLoad
from maga_tasks.llm.answer import SIDE_ROUTE_BYTES, read_bounded
from maga_tasks.llm.prometheus import parse_prometheus_text

if TYPE_CHECKING:
    from maga_tasks.llm.endpoints import Endpoint, Fleet

log = logging.getLogger(__name__)


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


class LoadWatch:
    """Reads the usable endpoints' /metrics and moves their windows."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.interval = fleet.settings.adaptive_interval_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        """Every `adaptive_interval_s`; a failing read never ends the watch."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.gather(*(self._read_load(e) for e in self.fleet.usable()))
            except Exception:  # a bug here must not stop the windows: say it, go on
                log.warning("reading the endpoints' load failed", exc_info=True)

    async def _fetch_load(self, endpoint: Endpoint) -> ServerLoad | None:
        """The endpoint's load from its /metrics; None when unreadable or without the
        queue gauges."""
        try:
            async with self.fleet.session.get(
                f"{endpoint.url}/metrics", timeout=aiohttp.ClientTimeout(total=min(5.0, 2 * self.interval)),
                allow_redirects=False,
            ) as response:
                text = await read_bounded(response, SIDE_ROUTE_BYTES) if response.status == 200 else None
                if text is not None:
                    return ServerLoad.from_metrics(parse_prometheus_text(text.decode("utf-8", "replace")))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        return None

    async def start_window(self, endpoint: Endpoint) -> None:
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


def load_report(endpoints: list[Endpoint]) -> list[dict]:
    """Per endpoint: its window, requests it holds or waits for, and the server's queue as
    last read (None when unknown); empty with a fixed cap."""
    report = []
    for endpoint in endpoints:
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
