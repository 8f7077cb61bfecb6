"""Benchmarks: how close the pipeline runs to the engine's limit, and what the client costs.

Two suites, each figure the median of repeated runs with min and max:

- engine: against one vLLM server, the standard serving benchmark (`vllm bench serve`)
  replays exactly the request stream a first expansion recorded (`tools.replay`: every
  pairs call and rewrite, the same prompt tokens in the order answered, the same output
  lengths with EOS ignored, sampled like our rewrites) at a fixed max concurrency; then
  our shard expansion runs over the same documents with that ceiling. Printed: output
  tokens/s of each and their ratio, requests/s, prefix-cache hit rate from /metrics
  deltas, client CPU seconds per 1,000 requests, peak RSS, and apart the cost of the
  pairs calls' grammar (the replay cannot carry it).
- client: against the test LLM server at zero latency, server and client pinned to
  different cores: requests/s the client sustains on one core, and peak RSS expanding a
  small and a ten times larger shard.
- fleet: several independent clients (processes) share one capacity-limited test LLM
  server (`--max-running`, with latency), each wanting `--fleet-concurrency` requests in
  flight: first with that fixed cap, then with adaptive concurrency. Printed per mode:
  output tokens/s (and the ratio adaptive/fixed), p50/p99 latency of the HTTP exchange
  and of the whole call (a request waiting for its window included), timeouts, and the
  server's longest waiting queue. Not part of `all`.

Each measured expansion runs in a child process, so CPU time and peak RSS are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from maga_tasks.recipe import builtin_recipe_path, load_recipe
from maga_tasks.tools.replay import engine_dataset, read_request_log, structured_output_cost
from maga_tasks.tools.test_server_process import TestServerProcess

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


# -- figures -------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        if not self.values:
            return {"median": None, "min": None, "max": None, "runs": 0, "unit": self.unit}
        return {
            "median": round(statistics.median(self.values), 4),
            "min": round(min(self.values), 4),
            "max": round(max(self.values), 4),
            "runs": len(self.values),
            "unit": self.unit,
        }


class Figures:
    def __init__(self):
        self._figures: dict[str, Figure] = {}

    def add(self, name: str, value: float | None, unit: str = "") -> None:
        figure = self._figures.setdefault(name, Figure(name, unit))
        if value is not None:
            figure.values.append(float(value))

    def as_dict(self) -> dict:
        return {name: figure.summary() for name, figure in self._figures.items()}


def markdown_table(title: str, figures: dict) -> str:
    lines = [f"### {title}", "", "| figure | median | min | max | runs |", "|---|---:|---:|---:|---:|"]
    for name, s in figures.items():
        if s["runs"]:
            unit = f" ({s['unit']})" if s["unit"] else ""
            lines.append(f"| {name}{unit} | {s['median']:,.3f} | {s['min']:,.3f} | {s['max']:,.3f} | {s['runs']} |")
        else:
            lines.append(f"| {name} | n/a | | | 0 |")
    return "\n".join(lines)


# -- corpora -------------------------------------------------------------------------


def write_bench_shard(path: Path, documents: int) -> Path:
    """A shard of real sample text; cycles the articles (with fresh ids) past their count."""
    from maga_tasks.data.sample_corpus import wikipedia_summaries

    articles = wikipedia_summaries()
    rows = [{"id": f"bench-{i:06d}", "text": articles[i % len(articles)]["text"]} for i in range(documents)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1024)
    return path


# -- one measured expansion, in a child process -------------------------------------


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("shard")
    parser.add_argument("output_root")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--recipe")
    parser.add_argument("--tokenizer")
    parser.add_argument("--served-model")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--cpu", type=int, help="pin this process to one core")
    parser.add_argument("--request-log", help="record every answered request here (the stream to replay)")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    from maga_tasks.settings import RunSettings
    from maga_tasks.engine.shard import expand_shard

    recipe = load_recipe(args.recipe, tokenizer=args.tokenizer)
    settings = RunSettings(
        endpoints=(args.endpoint,), max_concurrency=args.concurrency, served_model=args.served_model,
        progress_interval_s=60, request_timeout_s=600, request_log=args.request_log,
    )
    cpu_before, started = time.process_time(), time.perf_counter()
    result = expand_shard(args.shard, args.output_root, recipe, settings)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    print(json.dumps({
        "seconds": seconds,
        "cpu_seconds": cpu,
        "requests": result.requests,
        "documents": result.documents,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_uri": result.data_uri,
        "rejected_uri": result.rejected_uri,
    }))
    return 0


def measure_expansion(shard: Path, endpoint: str, concurrency: int, *, recipe: str | None = None,
                      tokenizer: str | None = None, served_model: str | None = None, cpu: int | None = None,
                      output_root: Path | None = None, request_log: Path | None = None) -> dict:
    output_root = output_root or Path(tempfile.mkdtemp(prefix="maga-bench-out-"))
    command = [sys.executable, "-m", "maga_tasks.tools.bench", "_child", str(shard), str(output_root),
               "--endpoint", endpoint, "--concurrency", str(concurrency)]
    for flag, value in (("--recipe", recipe), ("--tokenizer", tokenizer), ("--served-model", served_model),
                        ("--cpu", cpu), ("--request-log", request_log)):
        if value is not None:
            command += [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark expansion failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the engine's own limit: vllm bench serve replaying our requests -----------------


def vllm_bench_serve(url: str, model: str, tokenizer: str, dataset: Path, num_prompts: int, concurrency: int,
                     vllm_python: Path, sampling) -> dict:
    """The standard serving benchmark over our request stream, sampled like our rewrites.

    Same temperature, top_p and frequency penalty, and seeded requests (a fixed seed:
    vLLM then takes the per-request generator path our seeded requests take). Prompts
    go to the completions API with the chat template already applied, so the server
    sees the tokens our chat requests gave it. Not replayed: the pairs calls' grammar
    (`replay.structured_output_cost` measures it).
    """
    result_dir = Path(tempfile.mkdtemp(prefix="maga-vllm-bench-"))
    command = [
        str(vllm_python), str(REPO / "scripts" / "vllm_bench_serve.py"),
        "--backend", "openai", "--endpoint", "/v1/completions", "--base-url", url,
        "--model", model, "--tokenizer", tokenizer,
        "--dataset-name", "custom", "--dataset-path", str(dataset), "--custom-output-len", "-1",
        "--skip-chat-template",
        "--disable-shuffle", "--no-oversample", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--ignore-eos", "--temperature", str(sampling.temperature),
        "--top-p", str(sampling.top_p), "--extra-body", json.dumps({"seed": 0}),
        "--num-warmups", "0", "--disable-tqdm",
        *(["--frequency-penalty", str(sampling.frequency_penalty)] if sampling.frequency_penalty else []),
        "--save-result", "--result-dir", str(result_dir), "--result-filename", "result.json",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if os.environ.get("MAGA_API_KEY"):  # the benchmark's OpenAI backends send this one
        env["OPENAI_API_KEY"] = os.environ["MAGA_API_KEY"]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {done.stderr.strip()[-2000:]}")
    return json.loads((result_dir / "result.json").read_text())


def engine_suite(args, figures: Figures) -> dict:
    from maga_tasks.llm.prometheus import prefix_cache_hit_rate
    from maga_tasks.llm.vllm_local import default_vllm_python, read_metrics, start_vllm_server

    server = None
    url = args.endpoint
    model_dir = args.model_dir or str(REPO / "var" / "models" / "maga-tiny")
    served = args.served_model or "maga-tiny"
    if url is None:
        if not Path(model_dir, "config.json").exists():
            subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), model_dir], check=True)
        server = start_vllm_server(model_dir, served_model_name=served, max_num_seqs=max(args.concurrency, 8))
        server.wait_healthy(timeout=600)
        url = server.url
    tokenizer = args.tokenizer or model_dir
    recipe_path = args.recipe or str(builtin_recipe_path("tiny"))
    sampling = load_recipe(recipe_path).rewrite.sampling
    work = Path(tempfile.mkdtemp(prefix="maga-bench-engine-"))
    shard = write_bench_shard(work / "engine" / "part-0000.parquet", args.engine_docs)
    vllm_python = Path(args.vllm_python or default_vllm_python())
    try:
        # A first run warms the server and records the request stream to replay.
        measure_expansion(shard, url, args.concurrency, recipe=recipe_path, tokenizer=tokenizer,
                          served_model=served, output_root=work / "warm", request_log=work / "requests.jsonl")
        records = read_request_log(work / "requests.jsonl")
        dataset, prompts, prompt_tokens = engine_dataset(records, tokenizer, work / "replay.jsonl")
        for repeat in range(args.repeats):
            before = read_metrics(url)
            engine = vllm_bench_serve(url, served, tokenizer, dataset, prompts, args.concurrency, vllm_python, sampling)
            middle = read_metrics(url)
            ours = measure_expansion(shard, url, args.concurrency, recipe=recipe_path, tokenizer=tokenizer,
                                     served_model=served, output_root=work / f"run-{repeat}")
            after = read_metrics(url)
            ours_tps = ours["completion_tokens"] / ours["seconds"]
            figures.add("engine output tokens/s", engine["output_throughput"], "tok/s")
            figures.add("pipeline output tokens/s", ours_tps, "tok/s")
            figures.add("pipeline / engine throughput ratio", ours_tps / engine["output_throughput"], "x")
            figures.add("engine requests/s", engine["request_throughput"], "req/s")
            figures.add("pipeline requests/s", ours["requests"] / ours["seconds"], "req/s")
            figures.add("replayed / recorded prompt tokens", engine["total_input_tokens"] / max(1, prompt_tokens), "x")
            figures.add("engine prefix-cache hit rate", prefix_cache_hit_rate(before, middle), "share")
            figures.add("pipeline prefix-cache hit rate", prefix_cache_hit_rate(middle, after), "share")
            figures.add("pipeline client CPU s per 1,000 requests", 1000 * ours["cpu_seconds"] / max(1, ours["requests"]), "s")
            figures.add("pipeline peak RSS", ours["peak_rss_mb"], "MiB")
            log.info("engine run %d: engine %.1f tok/s, pipeline %.1f tok/s", repeat + 1,
                     engine["output_throughput"], ours_tps)
            cost = structured_output_cost(url, records, args.concurrency, os.environ.get("MAGA_API_KEY"))
            if cost is not None:
                figures.add("pairs calls with grammar: output tokens/s", cost["with_grammar_tps"], "tok/s")
                figures.add("pairs calls without grammar: output tokens/s", cost["without_grammar_tps"], "tok/s")
                figures.add("grammar cost: pairs time with / without", cost["with_grammar_s"] / cost["without_grammar_s"], "x")
                figures.add("pairs calls' share of output tokens", cost["pairs_output_share"], "share")
    finally:
        if server is not None:
            server.stop()
    return {"documents": args.engine_docs, "requests_replayed": prompts, "concurrency": args.concurrency,
            "endpoint": "local vLLM CPU (tiny random model)" if server else url, "served_model": served}


# -- client overhead against the test server at zero latency --------------------------


def client_suite(args, figures: Figures) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = cores[0], cores[-1]
    work = Path(tempfile.mkdtemp(prefix="maga-bench-client-"))
    small = write_bench_shard(work / "small" / "part-0000.parquet", args.client_docs)
    large = write_bench_shard(work / "large" / "part-0000.parquet", args.client_docs * 10)
    with TestServerProcess(cpu=server_core, log_dir=work) as server:
        for repeat in range(args.repeats):
            runs = {}
            for name, shard in (("small", small), ("large", large)):
                runs[name] = measure_expansion(shard, server.url, args.client_concurrency, cpu=client_core,
                                               output_root=work / f"{name}-{repeat}")
            for name, run in runs.items():
                figures.add(f"client requests/s on one core ({name} shard)", run["requests"] / run["seconds"], "req/s")
                figures.add(f"client CPU s per 1,000 requests ({name} shard)", 1000 * run["cpu_seconds"] / run["requests"], "s")
                figures.add(f"peak RSS, {run['documents']:,} documents", run["peak_rss_mb"], "MiB")
            figures.add("peak RSS ratio, 10x documents", runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"], "x")
    return {"documents": [args.client_docs, args.client_docs * 10], "concurrency": args.client_concurrency,
            "client_core": client_core, "server_core": server_core}


# -- a shared fleet: independent clients on one saturated server ----------------------


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


def percentile(values: list[float], share: float) -> float | None:
    """The value at `share` of the sorted values (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


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
                        ("--max-tokens", args.fleet_max_tokens)):
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
            figures.add("output tokens/s ratio adaptive / fixed", throughput["adaptive"] / max(throughput["fixed"], 1e-9), "x")
    setup = {"clients": args.fleet_clients, "cap_per_client": args.fleet_concurrency,
             "seconds": args.fleet_seconds, "request_timeout_s": args.fleet_request_timeout,
             "queue_over_time": {"columns": ["s", "running", "waiting"], **queues}}
    if server is None:
        return {**setup, "endpoint": url, "served_model": args.served_model, "max_tokens": args.fleet_max_tokens}
    return {**setup, "server_max_running": args.fleet_max_running, "server_latency_ms": args.fleet_latency_ms}


# -- command ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maga_tasks.tools.scale_bench import add_arguments as add_scale_arguments

    parser.add_argument("--short", action="store_true", help="small sizes and one repeat (CI)")
    parser.add_argument("--suite", choices=["all", "engine", "client", "quality", "fleet"], default="all",
                        help="quality: the real-model quality report; fleet: shared-server clients, fixed"
                        " cap vs adaptive (neither part of all)")
    parser.add_argument("--endpoint", help="a running vLLM server (default: start the tiny model locally)")
    parser.add_argument("--served-model", help="served name (default: the suite's local model)")
    parser.add_argument("--model-dir", help="model folder (default: var/models/maga-tiny; quality suite:"
                        " var/models/smollm2-135m-instruct)")
    parser.add_argument("--tokenizer", help="tokenizer dir/id for the replay (default: --model-dir)")
    parser.add_argument("--recipe", help="recipe for the engine suite (default: recipes/tiny.yaml)")
    parser.add_argument("--vllm-python", help="interpreter of the vLLM virtualenv")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--engine-docs", type=int, default=64)
    parser.add_argument("--client-docs", type=int, default=1000)
    parser.add_argument("--client-concurrency", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "artifacts" / "bench"))
    parser.add_argument("--quality-docs", type=int, default=40, help="quality suite: documents (short: 6)")
    parser.add_argument("--judge-sample", type=int, default=20, help="quality suite: rewrites the judge scores")
    parser.add_argument("--first-article", type=int, default=0, help="quality suite: first sample article")
    parser.add_argument("--fleet-clients", type=int, default=4, help="fleet suite: client processes")
    parser.add_argument("--fleet-concurrency", type=int, default=128, help="fleet suite: cap per client")
    parser.add_argument("--fleet-max-running", type=int, default=8, help="fleet suite: server capacity")
    parser.add_argument("--fleet-latency-ms", type=float, default=100.0, help="fleet suite: server latency")
    parser.add_argument("--fleet-seconds", type=float, default=12.0, help="fleet suite: seconds per mode")
    parser.add_argument("--fleet-request-timeout", type=float, default=3.0, help="fleet suite: request timeout")
    parser.add_argument("--fleet-max-tokens", type=int, help="fleet suite: cap each rewrite's max_tokens")
    add_scale_arguments(parser)


def run(args) -> dict:
    if args.scale:
        from maga_tasks.tools.scale_bench import run_scale

        return run_scale(args)
    if args.suite == "quality":
        from maga_tasks.tools.quality_report import markdown, run_quality

        figures = run_quality(args)
        sys.stderr.write(markdown(figures) + "\n")
        return figures
    if args.short:
        args.repeats, args.engine_docs, args.client_docs = 1, min(args.engine_docs, 12), min(args.client_docs, 200)
        args.concurrency = min(args.concurrency, 8)
        args.fleet_seconds = min(args.fleet_seconds, 6.0)
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "short": args.short}
    tables = []
    for suite, runner, title in (
        ("engine", engine_suite, "Pipeline vs engine (vLLM)"),
        ("client", client_suite, "Client overhead (test LLM server, zero latency)"),
        ("fleet", fleet_suite, "Shared fleet: fixed cap vs adaptive concurrency"),
    ):
        if args.suite == suite or (args.suite == "all" and suite != "fleet"):
            figures = Figures()
            setup = runner(args, figures)
            report[suite] = {"setup": setup, "figures": figures.as_dict()}
            if "served_model" in setup:
                title += f", {setup['served_model']}"
            elif suite == "fleet":
                title += f" (test server, {setup['server_max_running']} running at most)"
            tables.append(markdown_table(title, report[suite]["figures"]))
    return write_report(Path(args.out), "bench", report, tables)


def write_report(out: Path, name: str, report: dict, tables: list[str]) -> dict:
    """`{name}.json` and `{name}.md` (the tables) under `out`; the tables on stderr too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text("\n\n".join(tables) + "\n")
    sys.stderr.write("\n\n".join(tables) + "\n")
    report["files"] = [str(out / f"{name}.json"), str(out / f"{name}.md")]
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        sys.exit(_child(sys.argv[2:]))
    if sys.argv[1:2] == ["_fleet_child"]:
        sys.exit(_fleet_child(sys.argv[2:]))
    main_parser = argparse.ArgumentParser(prog="python -m maga_tasks.tools.bench")
    add_arguments(main_parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run(main_parser.parse_args())))
