"""A cancelled chat ends at once, whatever it waits for: a shard that stops (its task
killed, a stage that failed) must not hang on a request turned into a retry, and a
cancelled request must give back its place in the window and its slot."""

from __future__ import annotations

import asyncio

import pytest

from maga_tasks.llm.client import LLMClient
from maga_tasks.recipe import Sampling
from maga_tasks.settings import RunSettings

# A rewrite request to the test server (its faults aim at the method's stages).
MESSAGES = [{"role": "user", "content": "TASK: rewrite this note about rivers for children."}]
SAMPLING = Sampling(max_tokens=16)


async def _cancel_while(settings: RunSettings, *, waiting_behind_another: bool, ready) -> dict:
    """Start a chat (behind another holding the only place, when asked), cancel it once
    `ready(client)` holds, and report how it ended and what it left held."""
    async with LLMClient(settings, "maga-default") as client:  # the test server's model
        holder = None
        if waiting_behind_another:
            holder = asyncio.create_task(client.chat(MESSAGES, SAMPLING, request_id="holder"))
        if holder is not None:
            while client.stats.requests < 1:
                await asyncio.sleep(0.01)
        victim = asyncio.create_task(client.chat(MESSAGES, SAMPLING, request_id="victim"))
        for _ in range(1000):
            if ready(client):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the state to cancel in was never reached")
        victim.cancel()
        done, _ = await asyncio.wait({victim}, timeout=2.0)
        ended = "cancelled" if victim in done and victim.cancelled() else (
            f"ended otherwise: {victim.exception() or victim.result()}" if victim in done else "still running"
        )
        endpoint = client.endpoints[0]
        held = {"in_flight": endpoint.in_flight, "gate": endpoint.gate.admitted if endpoint.gate else None}
        if holder is not None:
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)
        return {"ended": ended, "held_after": held}


@pytest.mark.integration
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_a_chat_cancelled_in_flight_ends_and_frees_its_place(llm_server_factory, adaptive):
    server = llm_server_factory(latency_ms=3000)
    settings = RunSettings(endpoints=(server.url,), adaptive_concurrency=adaptive)
    outcome = asyncio.run(_cancel_while(settings, waiting_behind_another=False,
                                        ready=lambda c: c.endpoints[0].in_flight == 1))
    assert outcome["ended"] == "cancelled", outcome
    assert outcome["held_after"]["in_flight"] == 0, outcome


@pytest.mark.integration
@pytest.mark.parametrize("adaptive", [True, False], ids=["window", "semaphore"])
def test_a_chat_cancelled_while_waiting_for_a_place_ends(llm_server_factory, adaptive):
    # One place (a window of 1, or a cap of 1): the victim waits behind the holder.
    server = llm_server_factory(latency_ms=3000)
    settings = RunSettings(endpoints=(server.url,), adaptive_concurrency=adaptive, max_concurrency=1,
                           adaptive_initial_window=1)
    outcome = asyncio.run(_cancel_while(settings, waiting_behind_another=True,
                                        ready=lambda c: c.stats.requests == 1))
    assert outcome["ended"] == "cancelled", outcome
    assert outcome["held_after"]["in_flight"] == 1, outcome  # the holder's, still running


@pytest.mark.integration
def test_a_chat_cancelled_between_retries_ends(llm_server_factory):
    # Every answer is a 500: the chat is failing, backing off and retrying when cancelled.
    server = llm_server_factory("http500:1:inf")
    settings = RunSettings(endpoints=(server.url,), backoff_base_s=5, backoff_max_s=5, max_attempts=50)
    outcome = asyncio.run(_cancel_while(settings, waiting_behind_another=False,
                                        ready=lambda c: c.stats.retries >= 1))
    assert outcome["ended"] == "cancelled", outcome
    assert outcome["held_after"]["in_flight"] == 0, outcome
