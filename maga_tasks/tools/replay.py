"""Our request stream as the client recorded it (`RunSettings.request_log`), replayed.

The engine benchmark replays exactly what an expansion sent: every pairs call (one per
pair with a catalogue, each with its grammar) and every rewrite, in the order they were
answered, as prompts rendered with the model's own chat template (the tokens the
server saw) and the output lengths they got. The replay cannot carry a grammar per
request, so the cost of structured outputs is measured apart: the recorded pairs calls
sent again as they were, then without their grammar at the same output lengths.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp


def read_request_log(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def engine_dataset(records: list[dict], tokenizer_dir: str, out: Path) -> tuple[Path, int, int]:
    """A `vllm bench serve` custom dataset (for the completions API, chat template
    already applied). Returns the file, its request count and its prompt tokens as our
    requests counted them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    count = prompt_tokens = 0
    with open(out, "w", encoding="utf-8") as handle:
        for record in records:
            if record["completion_tokens"] <= 0:
                continue
            prompt = tokenizer.apply_chat_template(record["body"]["messages"], tokenize=False,
                                                   add_generation_prompt=True)
            handle.write(json.dumps({"prompt": prompt, "output_tokens": record["completion_tokens"]}) + "\n")
            count += 1
            prompt_tokens += record["prompt_tokens"]
    return out, count, prompt_tokens


def without_grammar(record: dict) -> dict:
    """The same request with no grammar, held to the length the grammar gave."""
    body = {k: v for k, v in record["body"].items() if k != "response_format"}
    return {**body, "max_tokens": record["completion_tokens"], "ignore_eos": True}


async def _send_all(url: str, bodies: list[dict], concurrency: int, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(concurrency)
    tokens = 0

    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=1800)) as session:
        async def send(body: dict) -> None:
            nonlocal tokens
            async with slots, session.post(f"{url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                tokens += (await response.json())["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(send(body) for body in bodies))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "completion_tokens": tokens, "requests": len(bodies)}


def structured_output_cost(url: str, records: list[dict], concurrency: int, api_key: str | None = None) -> dict | None:
    """The recorded pairs calls with their grammar and without it; None when the stream
    had no structured pairs calls."""
    pairs = [r for r in records
             if r["kind"] == "pairs" and "response_format" in r["body"] and r["completion_tokens"] > 0]
    if not pairs:
        return None
    grammar = asyncio.run(_send_all(url, [r["body"] for r in pairs], concurrency, api_key))
    plain = asyncio.run(_send_all(url, [without_grammar(r) for r in pairs], concurrency, api_key))
    stream_tokens = sum(r["completion_tokens"] for r in records)
    return {
        "requests": len(pairs),
        "with_grammar_tps": grammar["completion_tokens"] / grammar["seconds"],
        "without_grammar_tps": plain["completion_tokens"] / plain["seconds"],
        "with_grammar_s": grammar["seconds"],
        "without_grammar_s": plain["seconds"],
        "pairs_output_share": sum(r["completion_tokens"] for r in pairs) / max(1, stream_tokens),
    }
