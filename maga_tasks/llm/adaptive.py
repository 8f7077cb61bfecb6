"""Adaptive concurrency: how many requests one client keeps in flight on one endpoint.

Each endpoint gets a window, moved by AIMD (additive increase, multiplicative decrease)
from what the server says about its load, read from its `/metrics` every few seconds:

- congested (shrink, times `decrease`): new preemptions (`vllm:num_preemptions_total`
  rose), a waiting queue longer than `queue_min` or `queue_share` of the running
  requests, whichever is more, or a KV cache above `kv_high` with any request waiting
  (the engine is out of cache blocks: queued requests cannot start);
- free (grow) otherwise: a short queue keeps the engine fed as requests finish, and a
  full cache with nothing waiting is the best place to be. There is no band in which
  the window holds: AIMD needs the cycle of growth and cuts to even out the shares
  (clients that held still at the server's limit would keep whatever shares they had).

The window only grows while the client fills it (peak in flight reached the window):
a shard winding down must not earn a window it never tried. Until the first congestion
the window doubles (slow start), at most once per request latency and only once a
request has been answered: the gauges show a doubling only when the engine has taken
its requests in, which on a busy server is seconds later (a doubling per sample piled
three windows into a CPU server's queue before its gauges moved). After that it grows
by `increase` per sample. After a shrink, the next one waits one request latency: the
requests already sent still sit in the server's queue and must not be punished for twice.

Several clients on one server see the same gauges and react alike, so AIMD brings their
windows to equal shares without any talk between them.

Where the window starts (`start`, with the first read, before any request is sent): at
`initial_share` of the server's free slots (its slots minus running minus waiting
requests), never below `initial` and never above the ceiling. That needs the server's
slot count, which vLLM (0.32) does not publish in `/metrics` (its `--max-num-seqs` is in
no gauge); a server that does (`SLOT_GAUGES`: the test server, a proxy that knows its
worker's flag) gets it. Without it, or without a first read, the window starts at
`initial` as before: a guess from the client's own ceiling could flood a server several
shards share (four clients starting at 32 each on a 32-slot CPU server queued 96
requests and timed out 89 of them).

A server without usable metrics falls back to latency: the median seconds per output
token of the requests finished since the last sample, against the best median seen
(which drifts up slowly so an old optimum is forgotten). Well above the best, or any
timeout, is congestion; close to it is free capacity; between, the window holds (latency
is noisy). Nothing finished and nothing timed out: nothing to go by, the window holds.

`WindowController` is pure: the client feeds it samples (`observe`, `note_in_flight`,
`update`) and reads `window`; the clock is passed in.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

KV_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # vLLM V1, then V0
PREEMPTION_COUNTERS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
# The engine's request slots (vLLM's --max-num-seqs). Not a vLLM gauge: vLLM 0.32 has none
# for it; the test server publishes its --max-running as this one.
SLOT_GAUGES = ("maga:max_num_seqs",)


@dataclass(frozen=True)
class ServerLoad:
    """One endpoint's load as its `/metrics` reported it."""

    running: float
    waiting: float
    kv_cache_usage: float | None = None  # share of KV blocks in use, 0..1
    preemptions_total: float | None = None
    slots: float | None = None  # requests the engine runs at once, where the server says

    @classmethod
    def from_metrics(cls, totals: dict[str, float]) -> ServerLoad | None:
        """From metric totals (`parse_prometheus_text`); None without the queue gauges."""
        running = totals.get("vllm:num_requests_running")
        waiting = totals.get("vllm:num_requests_waiting")
        if running is None or waiting is None:
            return None
        kv = next((totals[name] for name in KV_GAUGES if name in totals), None)
        preemptions = next((totals[name] for name in PREEMPTION_COUNTERS if name in totals), None)
        slots = next((totals[name] for name in SLOT_GAUGES if name in totals), None)
        return cls(running, waiting, kv, preemptions, slots if slots and slots > 0 else None)

    @property
    def free_slots(self) -> float | None:
        """Slots neither running nor claimed by a waiting request (None: slots unknown)."""
        return None if self.slots is None else self.slots - self.running - self.waiting


@dataclass(frozen=True)
class AimdParams:
    """Tuning of `WindowController`; defaults fit vLLM's gauges."""

    floor: int = 1
    ceiling: int = 64
    initial: int = 8  # small: several clients starting at once must not fill a server queue before its gauges move
    # Of the free slots the first read shows, the share a window starts at (`start`).
    # Half: a lone client on an idle server starts at half of it and slow start takes it
    # to full one request latency later, once the gauges show the room; two clients
    # starting together fill the server exactly, and more queue at most (n/2 - 1) times
    # the slots, which AIMD then halves away. A client joining a busy server sees few
    # free slots and starts at `initial`, as every client did before.
    initial_share: float = 0.5
    slots: int = 0  # the engine's slots where its /metrics do not say (RunSettings.server_slots); 0: unknown
    increase: int = 0  # per sample after slow start; 0: ceiling / 64, at least 1
    decrease: float = 0.5
    queue_min: float = 2.0
    queue_share: float = 0.1  # of running requests
    kv_high: float = 0.9
    latency_high: float = 2.0  # times the best median: congested
    latency_low: float = 1.3  # times the best median: free
    best_drift: float = 1.02  # the best median grows by this per sample

    def __post_init__(self):
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"window floor {self.floor} must be in [1, ceiling {self.ceiling}]")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease {self.decrease} must be in (0, 1)")
        if not 0 < self.initial_share <= 1:
            raise ValueError(f"initial_share {self.initial_share} must be in (0, 1]")

    @property
    def step(self) -> int:
        # Scaled with the ceiling so recovery takes a like number of samples at any size;
        # every shard of a run has the same ceiling, so shares stay fair.
        return self.increase or max(1, round(self.ceiling / 64))


@dataclass
class WindowController:
    """The in-flight window of one endpoint (see the module docstring)."""

    params: AimdParams = field(default_factory=AimdParams)
    window: int = 0
    slow_start: bool = True
    last_load: ServerLoad | None = None
    signal: str = "none"  # what the last update went by: metrics, latency or none
    last_decision: str = "hold"
    _peak_in_flight: int = 0
    _latencies: list[float] = field(default_factory=list)  # seconds per output token
    _timeouts: int = 0
    _best: float | None = None
    _typical_latency_s: float = 0.0
    _last_shrink: float = float("-inf")
    _last_doubling: float = float("-inf")

    def __post_init__(self):
        p = self.params
        self.window = self.window or min(max(p.initial, p.floor), p.ceiling)

    # -- the first read ----------------------------------------------------------------

    def start(self, load: ServerLoad | None) -> int:
        """Set the window from the first read of the server's load, before any request
        (`load` None: unreadable); returns it. Without the server's slot count (its
        gauge, else `slots`) the window stays at `initial`."""
        p = self.params
        self.last_load = load  # the baseline the first `update` compares preemptions with
        if load is not None:
            self.signal = "metrics"
        free = None
        if load is not None:
            free = load.free_slots
            if free is None and p.slots:
                free = p.slots - load.running - load.waiting
        if free is not None:
            self.window = min(p.ceiling, max(self.window, int(p.initial_share * free)))
        return self.window

    # -- samples the client feeds ------------------------------------------------------

    def note_in_flight(self, in_flight: int) -> None:
        """Requests in flight on the endpoint now (called as one is admitted)."""
        self._peak_in_flight = max(self._peak_in_flight, in_flight)

    def observe(self, latency_s: float, completion_tokens: int) -> None:
        """A request the endpoint answered, and how long its HTTP exchange took."""
        self._latencies.append(latency_s / max(1, completion_tokens))
        # Shrinks are spaced by this: the time the requests already sent take to leave.
        self._typical_latency_s = (
            0.8 * self._typical_latency_s + 0.2 * latency_s if self._typical_latency_s else latency_s
        )

    def observe_timeout(self) -> None:
        self._timeouts += 1

    # -- the decision, once per sample -------------------------------------------------

    def update(self, load: ServerLoad | None, now: float) -> int:
        """Move the window by this sample (`load` None: the metrics were unusable); returns it."""
        previous, self.last_load = self.last_load, load
        if load is not None:
            self.signal = "metrics"
            decision = self._judge_load(load, previous)
        else:
            decision = self._judge_latency()
            self.signal = "latency" if decision != "unknown" else "none"
        limited = self._peak_in_flight >= self.window
        self._peak_in_flight = 0
        self._latencies.clear()
        self._timeouts = 0
        self.last_decision = decision
        if decision == "congested":
            self._shrink(now)
        elif decision == "free" and limited:
            self._grow(now)
        return self.window

    def _judge_load(self, load: ServerLoad, previous: ServerLoad | None) -> str:
        p = self.params
        preempted = (
            previous is not None
            and previous.preemptions_total is not None
            and load.preemptions_total is not None
            and load.preemptions_total > previous.preemptions_total
        )
        cache_full = load.kv_cache_usage is not None and load.kv_cache_usage >= p.kv_high
        queue_high = max(p.queue_min, p.queue_share * load.running)
        if preempted or load.waiting > queue_high or (cache_full and load.waiting > 0):
            return "congested"
        return "free"

    def _judge_latency(self) -> str:
        p = self.params
        if self._timeouts:
            return "congested"
        if not self._latencies:
            return "unknown"
        median = statistics.median(self._latencies)
        self._best = median if self._best is None else min(self._best * p.best_drift, median)
        if median > p.latency_high * self._best:
            return "congested"
        if median <= p.latency_low * self._best:
            return "free"
        return "hold"

    def _shrink(self, now: float) -> None:
        self.slow_start = False
        if now - self._last_shrink < self._typical_latency_s:
            return  # the last shrink has not had time to show in the server's queue yet
        self._last_shrink = now
        self.window = max(self.params.floor, int(self.window * self.params.decrease))

    def _grow(self, now: float) -> None:
        if not self.slow_start:
            self.window = min(self.params.ceiling, self.window + self.params.step)
            return
        if not self._typical_latency_s or now - self._last_doubling < self._typical_latency_s:
            return  # nothing answered yet, or the last doubling has not reached the gauges
        self._last_doubling = now
        self.window = min(self.params.ceiling, self.window * 2)
