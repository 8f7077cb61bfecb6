"""Adaptive concurrency: the AIMD window logic on its own, the test server's capacity
limit, and independent clients sharing one saturated server."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request

import pytest

from maga_tasks.llm.adaptive import AimdParams, ServerLoad, WindowController
from maga_tasks.tools.benchmarks.fleet import run_fleet_clients

FREE = ServerLoad(running=4, waiting=0, kv_cache_usage=0.3, preemptions_total=0)


def busy_controller(**params) -> WindowController:
    """A controller past slow start whose window is full of requests."""
    controller = WindowController(AimdParams(**{"ceiling": 64, "initial": 16, **params}))
    controller.slow_start = False
    return controller


def fill(controller: WindowController) -> None:
    controller.note_in_flight(controller.window)


# -- the controller ------------------------------------------------------------------


def test_slow_start_doubles_until_the_ceiling_while_the_server_has_room():
    controller = WindowController(AimdParams(ceiling=100, initial=10))
    seen = []
    for second in range(5):
        fill(controller)
        controller.observe(latency_s=0.5, completion_tokens=10)
        seen.append(controller.update(FREE, float(second)))
    assert seen == [20, 40, 80, 100, 100]


def test_slow_start_waits_for_an_answer_and_doubles_once_per_request_latency():
    """The gauges show a doubling only once the engine has taken its requests in: no
    doubling before anything was answered, then one per request latency (2.5 s here)."""
    controller = WindowController(AimdParams(ceiling=1000, initial=10))
    seen = []
    for second in range(8):
        fill(controller)
        if second >= 2:
            controller.observe(latency_s=2.5, completion_tokens=25)
        seen.append(controller.update(FREE, float(second)))
    assert seen == [10, 10, 20, 20, 20, 40, 40, 40]


def test_growth_is_additive_after_the_first_congestion():
    controller = busy_controller(ceiling=128, initial=40)
    fill(controller)
    controller.update(FREE, 0.0)
    assert controller.window == 42  # step: ceiling / 64
    assert busy_controller(increase=5).params.step == 5


def test_a_window_the_client_does_not_fill_does_not_grow():
    controller = busy_controller()
    controller.note_in_flight(3)
    assert controller.update(FREE, 0.0) == 16


@pytest.mark.parametrize("load", [
    ServerLoad(running=8, waiting=9, kv_cache_usage=0.5, preemptions_total=0),  # queue over its share
    ServerLoad(running=8, waiting=1, kv_cache_usage=0.95, preemptions_total=0),  # cache full, requests queued
])
def test_a_long_queue_or_a_full_cache_with_a_queue_halves_the_window(load):
    controller = busy_controller()
    assert controller.update(load, 0.0) == 8
    assert controller.last_decision == "congested"


def test_new_preemptions_shrink_and_old_ones_do_not():
    controller = busy_controller()
    controller.update(ServerLoad(4, 0, 0.3, 7), 0.0)  # a counter seen first is a baseline
    assert controller.window == 16
    fill(controller)
    assert controller.update(ServerLoad(4, 0, 0.3, 7), 10.0) == 17
    assert controller.update(ServerLoad(4, 0, 0.3, 9), 20.0) == 8


def test_a_short_queue_or_a_full_cache_with_nothing_waiting_still_grows():
    controller = busy_controller()
    for load in (ServerLoad(40, 3, 0.5, 0), ServerLoad(8, 0, 1.0, 0)):
        fill(controller)
        before = controller.window
        assert controller.update(load, 0.0) == before + 1
        assert controller.last_decision == "free"


def test_the_window_stays_between_floor_and_ceiling():
    controller = busy_controller(floor=3, ceiling=20, initial=20)
    congested = ServerLoad(8, 50, 1.0, 0)
    for second in range(10):
        controller.update(congested, second * 10.0)
    assert controller.window == 3
    for second in range(30):
        fill(controller)
        controller.update(FREE, 100.0 + second)
    assert controller.window == 20
    with pytest.raises(ValueError):
        AimdParams(floor=0)


def test_one_shrink_per_request_latency():
    controller = busy_controller()
    controller.observe(latency_s=5.0, completion_tokens=100)
    congested = ServerLoad(8, 50, 1.0, 0)
    assert controller.update(congested, 0.0) == 8
    assert controller.update(congested, 2.0) == 8  # the requests sent before have not left yet
    assert controller.update(congested, 6.0) == 4


def test_independent_clients_on_one_server_converge_to_fair_shares():
    """Two AIMD windows that see the same server gauges end up close, whatever they start at."""
    capacity = 40
    clients = [busy_controller(ceiling=256, initial=4), busy_controller(ceiling=256, initial=120)]
    for second in range(400):
        in_flight = sum(c.window for c in clients)
        running = min(in_flight, capacity)
        load = ServerLoad(running, max(0, in_flight - capacity), running / capacity, 0)
        for client in clients:
            fill(client)
            client.update(load, float(second))
    small, large = sorted(c.window for c in clients)
    assert large - small <= 4, (small, large)
    assert capacity * 0.5 <= small + large <= capacity * 1.3


def test_without_metrics_the_window_follows_latency():
    controller = busy_controller()
    for second in range(3):  # steady latency near the best seen: room to grow
        controller.observe(0.2, 100)
        fill(controller)
        controller.update(None, float(second))
    assert controller.window == 19 and controller.signal == "latency"
    controller.observe(0.9, 100)  # over twice the best per-token latency
    assert controller.update(None, 10.0) == 9
    controller.observe_timeout()
    assert controller.update(None, 100.0) == 4
    assert controller.update(None, 200.0) == 4  # nothing finished: nothing to go by
    assert controller.signal == "none"


def test_server_load_from_vllm_metric_names():
    v1 = {"vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 2.0,
          "vllm:kv_cache_usage_perc": 0.4, "vllm:num_preemptions_total": 1.0}
    assert ServerLoad.from_metrics(v1) == ServerLoad(3, 2, 0.4, 1)
    v0 = {"vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 0.0, "vllm:gpu_cache_usage_perc": 0.7}
    assert ServerLoad.from_metrics(v0) == ServerLoad(3, 0, 0.7, None)
    assert ServerLoad.from_metrics({"vllm:num_requests_running": 1.0}) is None


# -- the test server's capacity limit --------------------------------------------------


def metrics_of(server) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in re.findall(r"^(vllm:\w+)\{[^}]*\} (\S+)$", text, re.MULTILINE)}


async def post_chats(url: str, count: int, timeout_s: float) -> list[str]:
    """`count` rewrite requests at once; each one's status, or "timeout"."""
    import aiohttp

    from maga_tasks.method.prompts import rewrite_messages
    from maga_tasks.recipe import load_recipe

    body = {"model": "maga-default", "max_tokens": 64,
            "messages": rewrite_messages(load_recipe(), "Bees make honey from nectar.", "A poem.", "Children.")}

    async def one(session, i):
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body,
                                    headers={"X-Request-Id": f"d{i}/rewrite/0/0"},
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                await response.read()
                return str(response.status)
        except asyncio.TimeoutError:
            return "timeout"

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(session, i) for i in range(count)))


@pytest.mark.integration
def test_a_capacity_limited_server_queues_the_rest_and_says_so_in_vllm_gauges(llm_server_factory):
    server = llm_server_factory(latency_ms=1500, max_running=2)
    before = metrics_of(server)
    assert before["vllm:num_requests_waiting"] == 0 and before["vllm:kv_cache_usage_perc"] == 0
    results: list = []
    sender = threading.Thread(target=lambda: results.extend(asyncio.run(post_chats(server.url, 5, 30))))
    sender.start()
    deadline = time.monotonic() + 10
    while (now := metrics_of(server))["vllm:num_requests_waiting"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["vllm:num_requests_running"] == 2 and now["vllm:num_requests_waiting"] == 3
    assert now["vllm:kv_cache_usage_perc"] == 1.0
    assert now["vllm:num_preemptions_total"] == 1  # the fifth came with two already waiting
    sender.join(timeout=30)
    assert results == ["200"] * 5
    stats = server.stats()
    assert stats["max_running"] == 2 and stats["max_waiting"] == 3
    assert metrics_of(server)["vllm:num_requests_running"] == 0

    # Waiting counts toward a client's timeout; a client that gives up leaves the queue.
    # 1-2 answered at 1.5 s, 3-4 running and 5-6 still waiting at the 2 s timeout.
    server.reset()
    assert asyncio.run(post_chats(server.url, 6, 2.0)).count("timeout") == 4
    time.sleep(0.2)
    stats, after = server.stats(), metrics_of(server)
    # Each of the four leaves the queue or its slot; a waiting one may be started by the
    # slot another's cancel just freed before its own cancel arrives (seen 1 run in 5).
    assert stats["cancelled_running"] + stats["cancelled_waiting"] == 4 and stats["cancelled_running"] >= 2
    assert after["vllm:num_requests_waiting"] == 0 and after["vllm:num_requests_running"] == 0


# -- clients sharing one saturated server ----------------------------------------------


@pytest.mark.integration
def test_independent_adaptive_clients_keep_a_saturated_servers_queue_short(llm_server_factory):
    """Three client processes, each wanting 128 requests in flight, on a server that runs
    8 at a time (100 ms each, 80 requests/s). With a fixed cap of 128 each, the queue
    holds about 370 requests, over 4 s of waiting: a 2.5 s timeout hits. Adaptive windows
    keep the queue short and nothing times out; the peaks are counted by the server."""
    server = llm_server_factory(latency_ms=100, max_running=8)
    fleet = dict(clients=3, concurrency=128, request_timeout=2.5, interval=0.5)

    fixed = run_fleet_clients(server.url, fixed=True, seconds=5, **fleet)
    fixed_peak = server.stats()["max_waiting"]
    assert sum(r["timeouts"] for r in fixed) > 0, fixed_peak
    assert fixed_peak > 250

    server.reset()
    settled = {}
    adaptive = run_fleet_clients(server.url, fixed=False, seconds=10, midway=lambda: (
        settled.update(before_reset=server.stats()["max_waiting"]), server.reset()), **fleet)
    settled["second_half"] = server.stats()["max_waiting"]
    summary = [(r["completed"], r["timeouts"], r["errors"], r["window_max_second_half"]) for r in adaptive]
    assert sum(r["timeouts"] for r in adaptive) == 0 and not any(r["errors"] for r in adaptive), summary
    assert settled["before_reset"] < 3 * 32, settled  # the start: three initial windows at most
    assert settled["second_half"] <= 24, (settled, summary)  # settled: a few requests each
    done = [r["completed"] for r in adaptive]
    # Every client is served. How evenly depends on when each process got the CPU (the
    # clients start up to seconds apart on a loaded machine: 117/206/427 seen in a CI
    # rehearsal), so fairness is shown where it must hold: the unit test above.
    assert min(done) > 0, summary
    # The server stayed busy: most of its 80 requests/s were used.
    assert sum(r["completed"] / r["seconds"] for r in adaptive) > 40, summary


@pytest.mark.integration
def test_shard_progress_lines_show_the_window_and_the_servers_queue(tmp_path, llm_server_factory, caplog):
    from maga_tasks.data.sample_corpus import write_sample_corpus
    from maga_tasks.engine.shard import expand_shard
    from maga_tasks.recipe import load_recipe
    from maga_tasks.settings import RunSettings

    server = llm_server_factory(latency_ms=50, max_running=4)
    source = write_sample_corpus(tmp_path / "src", 1, 16)[0]
    reports: list[dict] = []
    settings = RunSettings(
        endpoints=(server.url,), max_concurrency=64, adaptive_interval_s=0.2, progress_interval_s=0.5
    )
    with caplog.at_level("INFO", logger="maga_tasks"):
        result = expand_shard(str(source), str(tmp_path / "out"), load_recipe(), settings, progress=reports.append)
    assert result.documents == 16 and result.rejected == 0
    lines = [r.getMessage() for r in caplog.records if "docs," in r.getMessage()]
    assert any(re.search(r", window \d+ \(server waiting \d+\)$", line) for line in lines), lines
    read = [w for report in reports for w in report["windows"] if w["server_waiting"] is not None]
    assert read and all(1 <= w["window"] <= 64 and w["signal"] == "metrics" for w in read), read
    # The server ran at most 4 and its queue stayed far below the 64 requests allowed.
    assert server.stats()["max_running"] == 4 and server.stats()["max_waiting"] < 64

    fixed = settings.model_copy(update={"adaptive_concurrency": False})
    caplog.clear()
    with caplog.at_level("INFO", logger="maga_tasks"):
        expand_shard(str(source), str(tmp_path / "fixed"), load_recipe(), fixed)
    assert not any("window" in r.getMessage() for r in caplog.records)
