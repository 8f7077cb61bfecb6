"""The test LLM server's state: its configuration, the counters `/_stats` and `/metrics`
report, and the capacity model of `--max-running` (a FIFO of waiting requests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from dataclasses import dataclass, field

from aiohttp import web

from maga_tasks.tools.test_server.faults import Fault, fault_fires

MAX_MODEL_LEN = 8192


@dataclass
class ServerState:
    """Configuration and counters of one server (the event loop is its only user)."""

    faults: tuple[Fault, ...]
    latency_s: float
    model: str
    api_key: str | None
    structured_outputs: bool
    die_after: int | None = None
    max_model_len: int = MAX_MODEL_LEN
    model_root: str | None = None  # what /v1/models reports as `root` (default: the model name)
    answered: int = 0
    fired_per_key: dict[tuple[int, str], int] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    # Prometheus counters are monotonic: /_reset leaves them alone.
    prompt_tokens_metric: int = 0
    generation_tokens_metric: int = 0
    success_metric: Counter = field(default_factory=Counter)
    running: int = 0
    max_running: int | None = None  # capacity: more requests than this wait in `queue`
    queue: deque = field(default_factory=deque)  # futures of waiting requests, FIFO
    preemptions_metric: int = 0
    publish_slots: bool = True  # /metrics says max_running as `maga:max_num_seqs`

    def reset_stats(self) -> None:
        self.stats = {
            "requests_total": 0,
            "by_stage": Counter(),
            "by_doc": Counter(),
            "by_request": Counter(),  # per request (document, stage, pair), its retries together
            "faults_fired": Counter(),
            "prompt_tokens_total": 0,
            "completion_tokens_total": 0,
            "max_running": self.running,
            "max_waiting": len(self.queue),
            "cancelled_waiting": 0,
            "cancelled_running": 0,
        }

    async def start_running(self) -> None:
        """Wait for a place among the running requests (FIFO behind the waiting ones)."""
        if self.max_running is not None and (self.running >= self.max_running or self.queue):
            if len(self.queue) >= self.max_running:
                self.preemptions_metric += 1
            waiter = asyncio.get_running_loop().create_future()
            self.queue.append(waiter)
            self.stats["max_waiting"] = max(self.stats["max_waiting"], len(self.queue))
            try:
                await waiter  # resolved by `stop_running`, the place already counted
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.stop_running()  # given a place just as the client left: pass it on
                else:
                    with contextlib.suppress(ValueError):  # `stop_running` may have dropped it
                        self.queue.remove(waiter)
                self.stats["cancelled_waiting"] += 1
                raise
        else:
            self.running += 1
        self.stats["max_running"] = max(self.stats["max_running"], self.running)

    def stop_running(self) -> None:
        """Leave the running requests; the first waiting one takes the place."""
        while self.queue:
            waiter = self.queue.popleft()
            if not waiter.done():  # a cancelled one is a client that left
                waiter.set_result(None)  # `running` stays: the place changes hands
                return
        self.running -= 1

    def fires(self, index: int, fault: Fault, stage: str, aim_key: str, request_key: str) -> bool:
        """Whether `fault` fires now (see `fault_fires`); a firing is counted in the stats."""
        if not fault_fires(self.fired_per_key, index, fault, stage, aim_key, request_key):
            return False
        self.stats["faults_fired"][fault.kind] += 1
        return True


STATE_KEY = web.AppKey("maga_test_llm_state", ServerState)
