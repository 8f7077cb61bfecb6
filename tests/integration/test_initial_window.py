"""Where the adaptive window starts: a share of the free slots the first /metrics read
shows, at least the configured initial window, at most the ceiling; as before when the
server does not say its slots or the read fails. A client against the test LLM server
here; the controller on its own in tests/unit/llm/test_initial_window.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from maga_tasks.llm.client import LLMClient, run_client
from maga_tasks.settings import RunSettings
from tests.support.servers import metrics_of, post_chats


def windows_when_ready(url: str, max_concurrency: int = 64, **extra) -> list[dict]:
    """Each endpoint's window once `wait_ready` returned, before any request."""
    settings = RunSettings(endpoints=(url,), max_concurrency=max_concurrency, **extra)

    async def ready() -> list[dict]:
        async with LLMClient(settings, "maga-default") as client:
            await client.wait_ready(30)
            return client.load_report()

    return run_client(ready())


def first_window(url: str, **settings) -> dict:
    return windows_when_ready(url, **settings)[0]


@pytest.mark.integration
def test_a_lone_client_on_an_idle_server_starts_at_half_its_slots(llm_server_factory):
    server = llm_server_factory(max_running=48)
    report = first_window(server.url)
    assert report["window"] == 24 and report["signal"] == "metrics"
    assert first_window(server.url, max_concurrency=16)["window"] == 16  # the ceiling still caps it
    assert windows_when_ready(server.url, adaptive_concurrency=False) == []  # a fixed cap has no window
    assert server.stats()["requests_total"] == 0  # the window was set before any request


@pytest.mark.integration
def test_a_server_with_a_queue_keeps_the_window_small(llm_server_factory):
    server = llm_server_factory(latency_ms=3000, max_running=4)
    sender = threading.Thread(target=lambda: asyncio.run(post_chats(server.url, 20, 30)))
    sender.start()
    try:
        deadline = time.monotonic() + 10
        while metrics_of(server)["vllm:num_requests_waiting"] < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        report = first_window(server.url)
        assert report["window"] == 8 and report["server_waiting"] >= 16, report
    finally:
        sender.join(timeout=60)


@pytest.mark.integration
def test_without_a_slot_count_the_window_starts_as_before(llm_server_factory):
    """vLLM publishes no slot count: the client cannot tell an idle 8-slot server from
    an idle 256-slot one, so it starts where it always did."""
    server = llm_server_factory(max_running=48, extra=["--no-slots-metric"])
    report = first_window(server.url)
    assert report["window"] == 8 and report["server_waiting"] == 0 and report["signal"] == "metrics"


@pytest.mark.integration
def test_server_slots_stand_in_for_the_gauge_vllm_lacks(llm_server_factory):
    server = llm_server_factory(max_running=48, extra=["--no-slots-metric"])
    report = first_window(server.url, server_slots=48)
    assert report["window"] == 24 and report["signal"] == "metrics", report
    assert server.stats()["requests_total"] == 0
