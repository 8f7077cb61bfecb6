"""Speculative decoding on a vLLM CPU server: acceptance and output tokens/s of the rewrite
stream, with and without n-gram prompt lookup, by sampling setting.

A rewrite copies much of its source, so n-gram prompt lookup (the draft is the tokens that
followed the same n-gram in the prompt) should be accepted often. Each mode starts its own
server (the speculative config is the server's), sends the same rewrite requests of
SmolLM2's recipe at each sampling setting, and reads the accepted and drafted token
counters from `/metrics`. The `off` mode is the baseline of the ratio.

    python -m maga_tasks.tools.spec_bench --model-dir var/models/smollm2-135m-instruct

Not a test: it prints figures (one JSON line per mode and setting, then a table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time

import aiohttp

from maga_tasks.data.sample_corpus import wikipedia_summaries
from maga_tasks.llm.vllm_local import read_metrics, start_vllm_server
from maga_tasks.method.prompts import rewrite_messages
from maga_tasks.recipe import builtin_recipe_path, load_recipe

MODES = {
    "off": None,
    "ngram-k4": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    "ngram-k2": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 5, "prompt_lookup_min": 3},
}
# (temperature, frequency_penalty): greedy, and the SmolLM2 recipe's rewrite sampling (0.7, 0.5).
SETTINGS = ((0.0, 0.0), (0.0, 0.5), (0.3, 0.0), (0.7, 0.0), (0.7, 0.5))
DRAFTED, ACCEPTED = "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total"


async def _rewrites(url: str, key: str, model: str, requests: list, sampling: dict, concurrency: int) -> int:
    """Sends the requests, `concurrency` at a time; the output tokens of all."""
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async def one(messages: list[dict]) -> int:
            async with gate:
                body = {"model": model, "messages": messages, "max_tokens": 256, **sampling}
                async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    return (await response.json())["usage"]["completion_tokens"]

        return sum(await asyncio.gather(*(one(m) for m in requests)))


def measure(args: argparse.Namespace) -> list[dict]:
    recipe = load_recipe(builtin_recipe_path("smollm2-135m"), model="bench", tokenizer=str(args.model_dir))
    genres, audiences = ("news report", "letter to a friend", "radio script"), ("high school students", "retirees")
    docs = [row["text"] for row in wikipedia_summaries(400)[: args.documents]]
    requests = [rewrite_messages(recipe, doc, genres[i % 3], audiences[i % 2]) for i, doc in enumerate(docs)]
    key, rows = secrets.token_hex(8), []
    for mode in args.modes:
        extra = ["--speculative-config", json.dumps(MODES[mode])] if MODES[mode] else []
        server = start_vllm_server(args.model_dir, served_model_name="bench", max_model_len=4096, max_num_seqs=32,
                                   api_key=key, dtype=args.dtype, extra_args=extra)
        try:
            server.wait_healthy(timeout=600)
            asyncio.run(_rewrites(server.url, key, "bench", requests[:2], {"temperature": 0.0}, 2))  # warm-up
            for temperature, penalty in SETTINGS:
                sampling = {"temperature": temperature, **({"frequency_penalty": penalty} if penalty else {})}
                before, started = read_metrics(server.url), time.monotonic()
                tokens = asyncio.run(_rewrites(server.url, key, "bench", requests, sampling, args.concurrency))
                seconds, after = time.monotonic() - started, read_metrics(server.url)
                drafted = after.get(DRAFTED, 0) - before.get(DRAFTED, 0)
                accepted = after.get(ACCEPTED, 0) - before.get(ACCEPTED, 0)
                row = {"mode": mode, "temperature": temperature, "frequency_penalty": penalty, "output_tokens": tokens,
                       "seconds": round(seconds, 1), "tok_s": round(tokens / seconds, 1),
                       "acceptance": round(accepted / drafted, 3) if drafted else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    return rows


def table(rows: list[dict]) -> str:
    base = {(r["temperature"], r["frequency_penalty"]): r["tok_s"] for r in rows if r["mode"] == "off"}
    lines = ["| mode | temperature | frequency_penalty | output tok/s | vs off | acceptance |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["tok_s"] / base[key] if (key := (r["temperature"], r["frequency_penalty"])) in base else None
        ratio_cell = "" if ratio is None else f"{ratio:.2f}"
        acceptance = "" if r["acceptance"] is None else r["acceptance"]
        lines.append(f"| {r['mode']} | {r['temperature']} | {r['frequency_penalty']} | {r['tok_s']} | "
                     f"{ratio_cell} | {acceptance} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="var/models/smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    print(table(measure(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
