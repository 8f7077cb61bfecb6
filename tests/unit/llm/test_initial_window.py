"""Where the adaptive window starts: a share of the free slots the first /metrics read
shows, at least the configured initial window, at most the ceiling; as before when the
server does not say its slots or the read fails."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_adaptive_concurrency import metrics_of, post_chats

from maga_tasks.llm.adaptive import AimdParams, ServerLoad, WindowController
from maga_tasks.llm.client import LLMClient, run_client
from maga_tasks.settings import RunSettings


def started(load: ServerLoad | None, **params) -> int:
    return WindowController(AimdParams(**{"ceiling": 64, "initial": 8, **params})).start(load)


# -- the controller ------------------------------------------------------------------


def test_the_first_read_sets_the_window_to_half_the_free_slots():
    assert started(ServerLoad(running=0, waiting=0, slots=48)) == 24
    assert started(ServerLoad(running=10, waiting=2, slots=48)) == 18
    assert started(ServerLoad(running=0, waiting=0, slots=400)) == 64  # never past the ceiling
    assert started(ServerLoad(running=0, waiting=0, slots=48), initial_share=0.75) == 36


def test_a_busy_server_or_no_slot_count_keeps_the_initial_window():
    assert started(ServerLoad(running=32, waiting=40, slots=32)) == 8  # a queue: no free slot
    assert started(ServerLoad(running=28, waiting=0, slots=32)) == 8  # 4 free: half is below the start
    assert started(ServerLoad(running=0, waiting=0)) == 8  # vLLM says no slot count
    assert started(None) == 8  # the read failed
    assert started(None, slots=48) == 8  # unreadable: the load is unknown, whatever the slots
    with pytest.raises(ValueError):
        AimdParams(initial_share=0)


def test_the_deployment_says_the_slots_vllm_does_not():
    assert started(ServerLoad(running=0, waiting=0), slots=48) == 24
    assert started(ServerLoad(running=40, waiting=8), slots=48) == 8  # busy: no room
    assert started(ServerLoad(running=0, waiting=0, slots=16), slots=48) == 8  # the server's own count wins


def test_the_first_read_is_the_baseline_of_the_next():
    """Preemptions counted before the client started are not its doing."""
    controller = WindowController(AimdParams(ceiling=64, initial=8))
    controller.start(ServerLoad(running=0, waiting=0, preemptions_total=7, slots=32))
    controller.note_in_flight(16)
    controller.update(ServerLoad(running=16, waiting=0, preemptions_total=7, slots=32), 0.0)
    assert controller.last_decision == "free" and controller.window == 16


def test_slot_count_read_from_the_metrics():
    totals = {"vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 1.0, "maga:max_num_seqs": 16.0}
    assert ServerLoad.from_metrics(totals).free_slots == 12
    assert ServerLoad.from_metrics({**totals, "maga:max_num_seqs": 0.0}).slots is None
    unsized = {"vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 1.0}
    assert ServerLoad.from_metrics(unsized).free_slots is None


# -- a client against the test server ----------------------------------------------------


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
