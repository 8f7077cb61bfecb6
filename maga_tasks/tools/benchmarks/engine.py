"""The engine and client suites of `maga bench` (see `tools.bench`): the pipeline against
vLLM's own serving benchmark replaying the same requests, and the client's overhead
against the test LLM server at zero latency. Each measured expansion runs in a child
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
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from maga_tasks.recipe import builtin_recipe_path, load_recipe
from maga_tasks.tools.benchmarks.figures import REPO, Figures
from maga_tasks.tools.replay import engine_dataset, read_request_log, structured_output_cost
from maga_tasks.tools.test_server_process import TestServerProcess

log = logging.getLogger(__name__)


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
    from maga_tasks.engine.shard import expand_shard
    from maga_tasks.settings import RunSettings

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
