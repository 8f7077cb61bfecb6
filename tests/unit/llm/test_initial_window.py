"""Where the adaptive window starts: a share of the free slots the first /metrics read
shows, at least the configured initial window, at most the ceiling; as before when the
server does not say its slots or the read fails. The controller on its own here; a
client against the test LLM server in tests/integration/test_initial_window.py."""

from __future__ import annotations

import pytest

from maga_tasks.llm.adaptive import AimdParams, ServerLoad, WindowController


def started(load: ServerLoad | None, **params) -> int:
    return WindowController(AimdParams(**{"ceiling": 64, "initial": 8, **params})).start(load)


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
