"""Benchmarks: how close the pipeline runs to the engine's limit, and what the client costs.

Two suites, each figure the median of repeated runs with min and max:

- engine: against one vLLM server, the standard serving benchmark (`vllm bench serve`)
  replays exactly the request stream a first expansion recorded (`tools.replay`: every
  pairs call and rewrite, the same prompt tokens in the order answered, the same output
  lengths with EOS ignored, sampled like our rewrites) at each max concurrency of a
  sweep (`--sweep`); then our shard expansion runs over the same documents with the
  `--concurrency` ceiling, and once more at RunSettings' defaults (adaptive windows,
  ceiling 128), compared with the engine's best over the sweep. Printed: output
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
- routing: two vLLM CPU servers with the tiny model; the same documents expanded with
  the client's document-affine routing over both endpoints, then through one URL, a
  round-robin balancer on loopback (`tools.benchmarks.routing`), at the same fixed
  concurrency. Printed per mode: the fleet's output tokens/s and each server's
  prefix-cache hit rate. Not part of `all`.

Each measured expansion runs in a child process, so CPU time and peak RSS are its own.
The suites live in `tools.benchmarks` (`engine`, `fleet`, `routing`); this module is the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from maga_tasks.tools.benchmarks.engine import _child, client_suite, engine_suite
from maga_tasks.tools.benchmarks.figures import REPO, Figures, markdown_table, write_report
from maga_tasks.tools.benchmarks.fleet import _fleet_child, fleet_suite
from maga_tasks.tools.benchmarks.routing import routing_suite

# -- command ---------------------------------------------------------------------------


def concurrency_list(text: str) -> tuple[int, ...]:
    """`4,8,16` -> (4, 8, 16); each a positive integer."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be positive integers: {text!r}")
    return levels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from maga_tasks.tools.scale_bench import add_arguments as add_scale_arguments

    parser.add_argument("--short", action="store_true", help="small sizes and one repeat (CI)")
    parser.add_argument("--suite", choices=["all", "engine", "client", "quality", "fleet", "routing"], default="all",
                        help="quality: the real-model quality report; fleet: shared-server clients, fixed"
                        " cap vs adaptive; routing: two vLLM servers, document-affine vs round-robin"
                        " (none of these part of all)")
    parser.add_argument("--endpoint", help="a running vLLM server (default: start the tiny model locally)")
    parser.add_argument("--served-model", help="served name (default: the suite's local model)")
    parser.add_argument("--model-dir", help="model folder (default: var/models/maga-tiny; quality suite:"
                        " var/models/smollm2-135m-instruct)")
    parser.add_argument("--tokenizer", help="tokenizer dir/id for the replay (default: --model-dir)")
    parser.add_argument("--recipe", help="recipe for the engine suite (default: recipes/tiny.yaml)")
    parser.add_argument("--vllm-python", help="interpreter of the vLLM virtualenv")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="engine suite: the pipeline's max_concurrency in the same-concurrency comparison")
    parser.add_argument("--sweep", type=concurrency_list,
                        help="engine suite: the replay's concurrencies, comma-separated (default 4,8,16,32,64,128;"
                        " short: half of --concurrency and --concurrency)")
    parser.add_argument("--engine-docs", type=int, default=64)
    parser.add_argument("--server-slots", type=int,
                        help="engine and fleet suites: the --endpoint server's --max-num-seqs, told to the clients"
                        " (engine: its default-settings run) as a deployment tells them (default: the suite's own"
                        " server's; unknown for --endpoint)")
    parser.add_argument("--client-docs", type=int, default=1000)
    parser.add_argument("--client-concurrency", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "artifacts" / "bench"))
    parser.add_argument("--quality-docs", type=int, default=40, help="quality suite: documents (short: 6)")
    parser.add_argument("--quality-shards", type=int, default=1,
                        help="quality suite: shards the documents are split into (a row each in the per-shard table)")
    parser.add_argument("--judge-sample", type=int, default=20, help="quality suite: rewrites the judge scores")
    parser.add_argument("--first-article", type=int, default=0, help="quality suite: first sample article")
    parser.add_argument("--judge-labels", help="quality suite: also judge every labelled rewrite of this JSON-lines"
                        " file (tests/fixtures/smollm2_outputs.jsonl) and count the genre answers by label")
    parser.add_argument("--fleet-clients", type=int, default=4, help="fleet suite: client processes")
    parser.add_argument("--fleet-concurrency", type=int, default=128, help="fleet suite: cap per client")
    parser.add_argument("--fleet-max-running", type=int, default=8, help="fleet suite: server capacity")
    parser.add_argument("--fleet-latency-ms", type=float, default=100.0, help="fleet suite: server latency")
    parser.add_argument("--fleet-seconds", type=float, default=12.0, help="fleet suite: seconds per mode")
    parser.add_argument("--fleet-request-timeout", type=float, default=3.0, help="fleet suite: request timeout")
    parser.add_argument("--fleet-max-tokens", type=int, help="fleet suite: cap each rewrite's max_tokens")
    parser.add_argument("--routing-docs", type=int, default=32, help="routing suite: documents (short: 4)")
    parser.add_argument("--routing-concurrency", type=int, default=16,
                        help="routing suite: fixed max_concurrency of the client, both modes")
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
        args.routing_docs = min(args.routing_docs, 4)
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "short": args.short}
    tables = []
    for suite, runner, title in (
        ("engine", engine_suite, "Pipeline vs engine (vLLM)"),
        ("client", client_suite, "Client overhead (test LLM server, zero latency)"),
        ("fleet", fleet_suite, "Shared fleet: fixed cap vs adaptive concurrency"),
        ("routing", routing_suite, "Two servers: document-affine routing vs a round-robin balancer"),
    ):
        if args.suite == suite or (args.suite == "all" and suite in ("engine", "client")):
            figures = Figures()
            setup = runner(args, figures)
            report[suite] = {"setup": setup, "figures": figures.as_dict()}
            if "served_model" in setup:
                title += f", {setup['served_model']}"
            elif suite == "fleet":
                title += f" (test server, {setup['server_max_running']} running at most)"
            tables.append(markdown_table(title, report[suite]["figures"]))
    return write_report(Path(args.out), "bench", report, tables)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        sys.exit(_child(sys.argv[2:]))
    if sys.argv[1:2] == ["_fleet_child"]:
        sys.exit(_fleet_child(sys.argv[2:]))
    main_parser = argparse.ArgumentParser(prog="python -m maga_tasks.tools.bench")
    add_arguments(main_parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(json.dumps(run(main_parser.parse_args())))
