"""The engine and client suites of `maga bench` (see `tools.bench`): the pipeline against
vLLM's own serving benchmark replaying the same requests (over a sweep of concurrencies,
to find the engine's best), and the client's overhead against the test LLM server at
zero latency. Each measured expansion runs in a child
process (`python -m maga_tasks.tools.bench _child`), so CPU time and peak RSS are its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from maga_tasks.recipe import builtin_recipe_path, load_recipe
from maga_tasks.tools.benchmarks.figures import REPO, Figures
from maga_tasks.tools.replay import engine_dataset, read_request_log, structured_output_cost
from maga_tasks.tools.test_server_process import TestServerProcess

log = logging.getLogger(__name__)

# The replay's concurrencies the engine suite tries, doubling: the engine's best is the
# mark the pipeline at its default settings is held to.
DEFAULT_SWEEP = (4, 8, 16, 32, 64, 128)


def write_bench_shard(path: Path, documents: int) -> Path:
    """A shard of real sample text; cycles the articles (with fresh ids) past their count."""
    from maga_tasks.data.sample_corpus import wikipedia_summaries

    articles = wikipedia_summaries()
    rows = [{"id": f"bench-{i:06d}", "text": articles[i % len(articles)]["text"]} for i in range(documents)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1024)
    return path


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("shard")
    parser.add_argument("output_root")
    parser.add_argument("--endpoint", action="append", required=True, help="repeat for several endpoints")
    parser.add_argument("--recipe")
    parser.add_argument("--tokenizer")
    parser.add_argument("--served-model")
    parser.add_argument("--concurrency", type=int, help="max_concurrency (default: RunSettings' default)")
    parser.add_argument("--fixed", action="store_true", help="a fixed max_concurrency, no adaptive windows")
    parser.add_argument("--server-slots", type=int, help="the engine's max_num_seqs, as a deployment sets it")
    parser.add_argument("--cpu", type=int, help="pin this process to one core")
    parser.add_argument("--request-log", help="record every answered request here (the stream to replay)")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    from maga_tasks.engine.shard import expand_shard
    from maga_tasks.settings import RunSettings

    recipe = load_recipe(args.recipe, tokenizer=args.tokenizer)
    chosen = {"max_concurrency": args.concurrency} if args.concurrency is not None else {}
    if args.fixed:
        chosen["adaptive_concurrency"] = False
    if args.server_slots is not None:
        chosen["server_slots"] = args.server_slots
    settings = RunSettings(
        endpoints=tuple(args.endpoint), served_model=args.served_model, progress_interval_s=60,
        request_timeout_s=600, request_log=args.request_log, **chosen,
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


def measure_expansion(shard: Path, endpoint: str | Sequence[str], concurrency: int | None, *,
                      recipe: str | None = None, tokenizer: str | None = None, served_model: str | None = None,
                      cpu: int | None = None, output_root: Path | None = None, request_log: Path | None = None,
                      fixed: bool = False, server_slots: int | None = None) -> dict:
    """One shard expansion in a child process; `concurrency` None keeps RunSettings' default
    (adaptive windows under a ceiling of 128), `fixed` turns the adaptive windows off,
    `server_slots` tells the client the engine's slots (as MAGA_SERVER_SLOTS does)."""
    output_root = output_root or Path(tempfile.mkdtemp(prefix="maga-bench-out-"))
    endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
    command = [sys.executable, "-m", "maga_tasks.tools.bench", "_child", str(shard), str(output_root)]
    for url in endpoints:
        command += ["--endpoint", url]
    if fixed:
        command.append("--fixed")
    for flag, value in (("--concurrency", concurrency), ("--recipe", recipe), ("--tokenizer", tokenizer),
                        ("--served-model", served_model), ("--cpu", cpu), ("--request-log", request_log),
                        ("--server-slots", server_slots)):
        if value is not None:
            command += [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark expansion failed: {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def sweep_levels(args) -> list[int]:
    """The replay's concurrencies: the sweep (two values in short mode) plus the
    pipeline's own `--concurrency`, so the same-concurrency row is always measured."""
    sweep = args.sweep or (DEFAULT_SWEEP if not args.short else (max(1, args.concurrency // 2), args.concurrency))
    return sorted(set(sweep) | {args.concurrency})


def engine_suite(args, figures: Figures) -> dict:
    from maga_tasks.llm.prometheus import prefix_cache_hit_rate
    from maga_tasks.llm.vllm_local import default_vllm_python, read_metrics, start_vllm_server
    from maga_tasks.settings import RunSettings

    defaults = {name: RunSettings.model_fields[name].default for name in ("max_concurrency", "adaptive_concurrency")}
    levels = sweep_levels(args)
    server = None
    slots = args.server_slots  # the engine's slots: given for --endpoint, known when this suite starts it
    url = args.endpoint
    model_dir = args.model_dir or str(REPO / "var" / "models" / "maga-tiny")
    served = args.served_model or "maga-tiny"
    if url is None:
        if not Path(model_dir, "config.json").exists():
            subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), model_dir], check=True)
        # Room for the sweep's top and for the pipeline's default ceiling.
        slots = max(8, *levels, defaults["max_concurrency"])
        server = start_vllm_server(model_dir, served_model_name=served, max_num_seqs=slots)
        server.wait_healthy(timeout=600)
        url = server.url
    tokenizer = args.tokenizer or model_dir
    recipe_path = args.recipe or str(builtin_recipe_path("tiny"))
    sampling = load_recipe(recipe_path).rewrite.sampling
    work = Path(tempfile.mkdtemp(prefix="maga-bench-engine-"))
    shard = write_bench_shard(work / "engine" / "part-0000.parquet", args.engine_docs)
    vllm_python = Path(args.vllm_python or default_vllm_python())
    expand = {"recipe": recipe_path, "tokenizer": tokenizer, "served_model": served}
    try:
        # A first run warms the server and records the request stream to replay.
        measure_expansion(shard, url, args.concurrency, output_root=work / "warm",
                          request_log=work / "requests.jsonl", **expand)
        records = read_request_log(work / "requests.jsonl")
        dataset, prompts, prompt_tokens = engine_dataset(records, tokenizer, work / "replay.jsonl")
        for repeat in range(args.repeats):
            swept: dict[int, float] = {}
            for level in levels:
                before = read_metrics(url)
                run = vllm_bench_serve(url, served, tokenizer, dataset, prompts, level, vllm_python, sampling)
                swept[level] = run["output_throughput"]
                figures.add(f"engine output tokens/s at concurrency {level}", swept[level], "tok/s")
                if level == args.concurrency:
                    engine, engine_hit_rate = run, prefix_cache_hit_rate(before, read_metrics(url))
            best = max(swept, key=swept.get)
            middle = read_metrics(url)
            ours = measure_expansion(shard, url, args.concurrency, output_root=work / f"run-{repeat}", **expand)
            after = read_metrics(url)
            # The defaults as deployed: a worker's slots are configured beside it (compose, Helm).
            default = measure_expansion(shard, url, None, output_root=work / f"default-{repeat}",
                                        server_slots=slots, **expand)
            ours_tps = ours["completion_tokens"] / ours["seconds"]
            default_tps = default["completion_tokens"] / default["seconds"]
            figures.add("best engine output tokens/s (sweep)", swept[best], "tok/s")
            figures.add("best engine concurrency", best, "requests")
            figures.add("pipeline output tokens/s, default settings", default_tps, "tok/s")
            figures.add("pipeline (default settings) / best engine", default_tps / swept[best], "x")
            figures.add("engine output tokens/s", engine["output_throughput"], "tok/s")
            figures.add("pipeline output tokens/s", ours_tps, "tok/s")
            figures.add("pipeline / engine throughput ratio", ours_tps / engine["output_throughput"], "x")
            figures.add("engine requests/s", engine["request_throughput"], "req/s")
            figures.add("pipeline requests/s", ours["requests"] / ours["seconds"], "req/s")
            figures.add("replayed / recorded prompt tokens", engine["total_input_tokens"] / max(1, prompt_tokens), "x")
            figures.add("engine prefix-cache hit rate", engine_hit_rate, "share")
            figures.add("pipeline prefix-cache hit rate", prefix_cache_hit_rate(middle, after), "share")
            cpu_per_1k = 1000 * ours["cpu_seconds"] / max(1, ours["requests"])
            figures.add("pipeline client CPU s per 1,000 requests", cpu_per_1k, "s")
            figures.add("pipeline peak RSS", ours["peak_rss_mb"], "MiB")
            log.info("engine run %d: best engine %.1f tok/s at %d; pipeline %.1f tok/s at %d, %.1f at its defaults",
                     repeat + 1, swept[best], best, ours_tps, args.concurrency, default_tps)
            cost = structured_output_cost(url, records, args.concurrency, os.environ.get("MAGA_API_KEY"))
            if cost is not None:
                figures.add("pairs calls with grammar: output tokens/s", cost["with_grammar_tps"], "tok/s")
                figures.add("pairs calls without grammar: output tokens/s", cost["without_grammar_tps"], "tok/s")
                grammar_cost = cost["with_grammar_s"] / cost["without_grammar_s"]
                figures.add("grammar cost: pairs time with / without", grammar_cost, "x")
                figures.add("pairs calls' share of output tokens", cost["pairs_output_share"], "share")
    finally:
        if server is not None:
            server.stop()
    return {"documents": args.engine_docs, "requests_replayed": prompts, "concurrency": args.concurrency,
            "sweep": levels, "pipeline_defaults": defaults,
            "endpoint": "local vLLM CPU (tiny random model)" if server else url, "served_model": served}


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
                cpu_per_1k = 1000 * run["cpu_seconds"] / run["requests"]
                figures.add(f"client CPU s per 1,000 requests ({name} shard)", cpu_per_1k, "s")
                figures.add(f"peak RSS, {run['documents']:,} documents", run["peak_rss_mb"], "MiB")
            rss_ratio = runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"]
            figures.add("peak RSS ratio, 10x documents", rss_ratio, "x")
    return {"documents": [args.client_docs, args.client_docs * 10], "concurrency": args.client_concurrency,
            "client_core": client_core, "server_core": server_core}
