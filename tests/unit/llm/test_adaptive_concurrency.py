"""Adaptive concurrency: the AIMD window logic on its own (the windows against the test
LLM server: tests/integration/test_adaptive_concurrency.py)."""

from __future__ import annotations

import pytest

from maga_tasks.llm.adaptive import AimdParams, ServerLoad, WindowController

FREE = ServerLoad(running=4, waiting=0, kv_cache_usage=0.3, preemptions_total=0)


def busy_controller(**params) -> WindowController:
    """A controller past slow start whose window is full of requests."""
    controller = WindowController(AimdParams(**{"ceiling": 64, "initial": 16, **params}))
    controller.slow_start = False
    return controller


def fill(controller: WindowController) -> None:
    controller.note_in_flight(controller.window)


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
