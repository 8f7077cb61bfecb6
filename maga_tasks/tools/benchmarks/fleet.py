"""The fleet suite of `maga bench` (see `tools.bench`): independent client processes
(`python -m maga_tasks.tools.bench _fleet_child`) share one capacity-limited test LLM
server, first with a fixed cap, then with adaptive concurrency."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from maga_tasks.recipe import load_recipe
from maga_tasks.tools.benchmarks.figures import REPO, Figures, percentile
from maga_tasks.tools.test_server_process import TestServerProcess

log = logging.getLogger(__name__)


def _fleet_child(argv: list[str]) -> int:
    """One client of the fleet suite: keeps `--concurrency` requests wanted for
    `--seconds`, then prints what it saw as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--name", default="c0")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--fixed", action="store_true", help="pin the cap (no adaptive concurrency)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--request-timeout", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.5, help="adaptive_interval_s")
    parser.add_argument("--recipe", help="recipe whose rewrite prompt and sampling the requests use")
    parser.add_argument("--served-model")
    parser.add_argument("--max-tokens", type=int, help="cap the rewrite's max_tokens (short requests)")
    parser.add_argument("--server-slots", type=int, default=0, help="the server's --max-num-seqs (0: unknown)")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_drive_fleet_client(args))))
    return 0


async def _drive_fleet_client(args) -> dict:
    from collections import Counter

    from maga_tasks.data.sample_corpus import wikipedia_summaries
    from maga_tasks.errors import MagaError
    from maga_tasks.llm.client import LLMClient
    from maga_tasks.llm.failure import RequestFailed
    from maga_tasks.method.prompts import rewrite_messages
    from maga_tasks.settings import RunSettings

    recipe = load_recipe(args.recipe)
    sampling = recipe.rewrite.sampling
    if args.max_tokens:
        sampling = sampling.model_copy(update={"max_tokens": args.max_tokens})
    texts = [a["text"] for a in wikipedia_summaries()[:64]]
    settings = RunSettings(
        endpoints=(args.endpoint,), served_model=args.served_model, api_key=os.environ.get("MAGA_API_KEY") or None,
        max_concurrency=args.concurrency, adaptive_concurrency=not args.fixed,
        adaptive_interval_s=args.interval, request_timeout_s=args.request_timeout,
        max_attempts=1,  # every timeout is counted once, not hidden by a retry
        server_slots=args.server_slots,
    )
    calls, exchanges, errors, windows = [], [], Counter(), []
    stopping = asyncio.Event()
    tokens = 0
    async with LLMClient(settings, recipe.model) as client:
        await client.wait_ready(30)

        async def want_requests(worker: int) -> None:
            nonlocal tokens
            for n in range(10**9):
                if stopping.is_set():
                    return
                started = time.monotonic()
                try:
                    completion = await client.chat(
                        rewrite_messages(recipe, texts[(worker + n) % len(texts)], "A short tutorial.", "Students."),
                        sampling, request_id=f"{args.name}w{worker}n{n}/rewrite/0",
                    )
                except RequestFailed as error:
                    errors[error.failure.reason] += 1
                    continue
                except MagaError as error:
                    errors[type(error).__name__] += 1
                    continue
                calls.append(time.monotonic() - started)
                exchanges.append(completion.latency_s)
                tokens += completion.completion_tokens

        async def watch_windows() -> None:
            while True:
                await asyncio.sleep(0.25)
                windows.extend(w["window"] for w in client.load_report())

        tasks = [asyncio.create_task(want_requests(i)) for i in range(args.concurrency)]
        tasks.append(asyncio.create_task(watch_windows()))
        started = time.monotonic()
        await asyncio.sleep(args.seconds)
        seconds = time.monotonic() - started
        stopping.set()
        for task in tasks:  # requests still out when time is up are not counted
            task.cancel()
        # A cancel the client swallows (seen once in CI: a child hung past 120 s) must
        # not hang the child: the flag ends each loop, the wait is bounded.
        await asyncio.wait(tasks, timeout=args.request_timeout + 10)
        timeouts = client.stats.failures.get("retryable_timeout", 0)
    half = windows[len(windows) // 2:]
    return {
        "name": args.name, "adaptive": not args.fixed, "seconds": round(seconds, 3),
        "completed": len(calls), "completion_tokens": tokens, "timeouts": timeouts, "errors": dict(errors),
        "call_latencies": [round(x, 4) for x in calls], "exchange_latencies": [round(x, 4) for x in exchanges],
        "window_final": windows[-1] if windows else None,
        "window_max_second_half": max(half) if half else None,
    }


def run_fleet_clients(url: str, clients: int, *, fixed: bool, concurrency: int = 128, seconds: float = 10.0,
                      request_timeout: float = 5.0, interval: float = 0.5, midway=None,
                      extra: tuple[str, ...] = ()) -> list[dict]:
    """Start `clients` fleet clients (processes) on `url` at once, wait, return their
    reports. `midway`, when given, is called halfway through (e.g. to reset the
    server's peaks, so the second half can be judged alone); `extra` are more
    `_fleet_child` options (recipe, served model, max tokens)."""
    command = [sys.executable, "-m", "maga_tasks.tools.bench", "_fleet_child", "--endpoint", url,
               "--concurrency", str(concurrency), "--seconds", str(seconds),
               "--request-timeout", str(request_timeout), "--interval", str(interval),
               *extra] + (["--fixed"] if fixed else [])
    children = [subprocess.Popen(command + ["--name", f"c{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=REPO) for i in range(clients)]
    if midway is not None:
        time.sleep(2.0 + seconds / 2)  # about the children's start-up, then half their run
        midway()
    reports = []
    for child in children:
        out, err = child.communicate(timeout=seconds + request_timeout + 120)
        if child.returncode != 0:
            raise RuntimeError(f"fleet client failed: {err.strip()[-1500:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


class QueueSampler:
    """The server's running and waiting requests, read from /metrics every `interval`
    seconds on a thread: the queue over time, for either kind of server."""

    def __init__(self, url: str, interval: float = 1.0):
        self.url, self.interval, self.samples = url, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from maga_tasks.llm.vllm_local import read_metrics

        started = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                metrics = read_metrics(self.url, timeout=5, api_key=os.environ.get("MAGA_API_KEY") or None)
            except Exception:  # a busy server may miss a read; the series shows the gap
                continue
            self.samples.append((round(time.monotonic() - started, 1), int(metrics.get("vllm:num_requests_running", 0)),
                                 int(metrics.get("vllm:num_requests_waiting", 0))))

    def __enter__(self) -> "QueueSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_until_idle(url: str, timeout: float = 300.0) -> None:
    """Until the server runs and queues nothing: requests a previous mode abandoned
    (timed out on the client) must not weigh on the next one."""
    from maga_tasks.llm.vllm_local import read_metrics

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            metrics = read_metrics(url, api_key=os.environ.get("MAGA_API_KEY") or None)
        except Exception:  # a server busy with the abandoned requests may miss a read
            metrics = None
        if metrics and metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0) == 0:
            return
        time.sleep(1.0)
    raise RuntimeError(f"{url} still busy after {timeout:.0f} s")


def fleet_suite(args, figures: Figures) -> dict:
    """Against `--endpoint` (a real vLLM server) when given, else a capacity-limited
    test server started here."""
    work = Path(tempfile.mkdtemp(prefix="maga-bench-fleet-"))
    extra = []
    for flag, value in (("--recipe", args.recipe), ("--served-model", args.served_model),
                        ("--max-tokens", args.fleet_max_tokens), ("--server-slots", args.server_slots)):
        if value:
            extra += [flag, str(value)]
    throughput, queues = {}, {}
    with contextlib.ExitStack() as stack:
        if args.endpoint:
            url, server = args.endpoint, None
        else:
            server = stack.enter_context(TestServerProcess(
                max_running=args.fleet_max_running, latency_ms=args.fleet_latency_ms, log_dir=work))
            url = server.url
        for repeat in range(args.repeats):
            for mode in ("fixed", "adaptive"):
                wait_until_idle(url)
                if server is not None:
                    server.reset()
                with QueueSampler(url, interval=0.5 if server else 2.0) as sampler:
                    reports = run_fleet_clients(url, args.fleet_clients, fixed=mode == "fixed",
                                                concurrency=args.fleet_concurrency, seconds=args.fleet_seconds,
                                                request_timeout=args.fleet_request_timeout, extra=tuple(extra))
                queues[f"{mode}-{repeat}"] = sampler.samples
                waiting = [w for _, _, w in sampler.samples]
                calls = [x for r in reports for x in r["call_latencies"]]
                exchanges = [x for r in reports for x in r["exchange_latencies"]]
                throughput[mode] = sum(r["completion_tokens"] / r["seconds"] for r in reports)
                figures.add(f"{mode}: output tokens/s (all clients)", throughput[mode], "tok/s")
                figures.add(f"{mode}: p50 latency, HTTP exchange", percentile(exchanges, 0.5), "s")
                figures.add(f"{mode}: p99 latency, HTTP exchange", percentile(exchanges, 0.99), "s")
                figures.add(f"{mode}: p50 latency, whole call", percentile(calls, 0.5), "s")
                figures.add(f"{mode}: p99 latency, whole call", percentile(calls, 0.99), "s")
                figures.add(f"{mode}: timeouts (all clients)", sum(r["timeouts"] for r in reports), "requests")
                figures.add(f"{mode}: max server waiting queue", max(waiting, default=0), "requests")
                figures.add(f"{mode}: median server waiting queue", percentile(waiting, 0.5), "requests")
                done = [r["completed"] for r in reports]
                figures.add(f"{mode}: client share spread (max/min completed)", max(done) / max(1, min(done)), "x")
                log.info("fleet %s run %d: %.0f tok/s, %d timeouts, max waiting %d", mode, repeat + 1,
                         throughput[mode], sum(r["timeouts"] for r in reports), max(waiting, default=0))
            figures.add("output tokens/s ratio adaptive / fixed",
                        throughput["adaptive"] / max(throughput["fixed"], 1e-9), "x")
    setup = {"clients": args.fleet_clients, "cap_per_client": args.fleet_concurrency,
             "seconds": args.fleet_seconds, "request_timeout_s": args.fleet_request_timeout,
             "queue_over_time": {"columns": ["s", "running", "waiting"], **queues}}
    if server is None:
        return {**setup, "endpoint": url, "served_model": args.served_model, "max_tokens": args.fleet_max_tokens}
    return {**setup, "server_max_running": args.fleet_max_running, "server_latency_ms": args.fleet_latency_ms}
