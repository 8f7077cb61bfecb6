"""The pipeline end to end against the real vLLM CPU engine serving `maga-tiny`.

- A shard of 50 documents of ~400 tokens: pairs pass with structured outputs (valid JSON
  from random weights), rewrites run, the shard commits; the usage tokens written in the
  output agree exactly with the server's /metrics counters, and the prefix-cache hit rate
  of the run (from /metrics) is above 0.5 with the default prompt layout.
- The server SIGKILLed mid-shard: the run ends with `EndpointsUnavailable`, the
  checkpoint keeps what finished; the server started again on the same port, the rerun
  resumes and completes the shard with every (document, pair) exactly once.

The model's text is random; its tokens, grammar-constrained JSON, prefix cache, metrics,
authentication and failures are real. Tests are ordered so that the server of the kill
test is stopped before the session server is first started: two vLLM servers never
share the machine's two cores.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maga_tasks.data.layout import shard_paths
from maga_tasks.data.sample_corpus import wikipedia_summaries
from maga_tasks.engine.shard import expand_shard
from maga_tasks.errors import EndpointsUnavailable
from maga_tasks.llm.prometheus import prefix_cache_hit_rate
from maga_tasks.llm.vllm_local import (
    free_port,
    read_metrics,
    start_vllm_server,
)
from maga_tasks.method.judging import judge_committed_shard
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings
from tests.support.vllm import TINY_RECIPE

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ARTICLES_PER_DOCUMENT = 3  # three summaries make a document of ~400 tokens (211-617 here)


def write_wiki_shard(path: Path, documents: int, first_article: int) -> str:
    """A source shard whose documents each join three Wikipedia summaries.

    `first_article` keeps the tests' documents apart, so that one test's prefix cache
    never serves another's documents.
    """
    articles = wikipedia_summaries()
    rows = []
    for d in range(documents):
        chunk = articles[first_article + d * ARTICLES_PER_DOCUMENT : first_article + (d + 1) * ARTICLES_PER_DOCUMENT]
        rows.append({
            "id": f"wiki-{first_article}-{d:03d}",
            "text": "\n\n".join(a["text"] for a in chunk),
            "title": " / ".join(a["title"] for a in chunk),
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def read_output(output_root: str, recipe_id: str, shard: str) -> tuple[list[dict], list[dict]]:
    """(accepted rows, rejected rows) of a committed shard."""
    paths = shard_paths(output_root, recipe_id, shard)
    return pq.read_table(paths.data).to_pylist(), pq.read_table(paths.rejected).to_pylist()


def assert_every_pair_exactly_once(accepted: list[dict], rejected: list[dict], documents: int, pairs: int) -> None:
    rows = accepted + rejected
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "duplicate row ids"
    keys = Counter((row["source_id"], row["pair_index"]) for row in rows)
    assert all(count == 1 for count in keys.values()), [k for k, c in keys.items() if c > 1][:5]
    per_document = Counter(source_id for source_id, _ in keys)
    assert len(per_document) == documents
    assert set(per_document.values()) == {pairs}


# -- the server killed mid-shard, started again ----------------------------------------


def test_server_killed_mid_shard_then_restarted_rerun_completes_without_duplicates(
    tiny_model_dir, vllm_python, vllm_api_key, tmp_path
):
    documents, kill_after = 24, 6
    source = write_wiki_shard(tmp_path / "source" / "killed.parquet", documents, first_article=6000)
    output_root = str(tmp_path / "expanded")
    recipe = load_recipe(TINY_RECIPE, tokenizer=str(tiny_model_dir))
    port = free_port()

    def start_server(log_name: str):
        server = start_vllm_server(
            tiny_model_dir, python=vllm_python, port=port, served_model_name=recipe.model,
            api_key=vllm_api_key, log_path=tmp_path / log_name,
        )
        try:
            return server, server.wait_healthy(timeout=300)
        except BaseException:
            server.stop()
            raise

    server, first_startup = start_server("vllm-1.log")
    try:
        # A short all-down timeout makes the outcome deterministic: the killed server
        # stays down far longer than 3 s, so the run must fail rather than wait.
        settings = RunSettings(
            endpoints=(server.url,), api_key=vllm_api_key, max_concurrency=16,
            all_down_timeout_s=3, endpoint_probe_interval_s=0.5, backoff_base_s=0.2,
            progress_interval_s=0.2,
        )
        enough_done = threading.Event()
        outcome: dict = {}

        def progress(snapshot: dict) -> None:
            if snapshot["documents_done"] >= kill_after:
                enough_done.set()

        def first_run() -> None:
            try:
                outcome["result"] = expand_shard(source, output_root, recipe, settings, progress=progress)
            except Exception as error:  # handed to the test thread below
                outcome["error"] = error

        runner = threading.Thread(target=first_run, name="first-run", daemon=True)
        runner.start()
        deadline = time.monotonic() + 300
        while not enough_done.wait(0.5):
            assert runner.is_alive(), f"the first run ended before the kill: {outcome}"
            assert time.monotonic() < deadline, f"fewer than {kill_after} documents in 300 s"
        killed_at = time.monotonic()
        server.kill()
        runner.join(timeout=120)
        assert not runner.is_alive(), "expand_shard kept waiting for a dead server"
        failed_after = time.monotonic() - killed_at
        assert isinstance(outcome.get("error"), EndpointsUnavailable), outcome

        paths = shard_paths(output_root, recipe.recipe_id, "killed")
        assert not Path(paths.data).exists() and not Path(paths.rejected).exists(), "committed after a kill"
        checkpointed = set()
        for segment in Path(paths.work).glob("part-*"):
            for line in segment.read_bytes().splitlines(keepends=True):
                if line.endswith(b"\n"):
                    checkpointed.add(json.loads(line)["i"])
        assert kill_after <= len(checkpointed) < documents, len(checkpointed)

        server, second_startup = start_server("vllm-2.log")
        assert server.port == port
        result = expand_shard(source, output_root, recipe, settings.model_copy(update={"endpoints": (server.url,)}))
    finally:
        server.stop()

    assert result.documents == documents
    assert result.resumed_documents == len(checkpointed) > 0
    accepted, rejected = read_output(output_root, recipe.recipe_id, "killed")
    assert result.accepted == len(accepted) and result.rejected == len(rejected)
    assert_every_pair_exactly_once(accepted, rejected, documents, recipe.pairs_per_document)
    # The kill cost only requests in flight: no document was rejected for it.
    reasons = Counter(row["reject_reason"] for row in rejected)
    assert not [r for r in reasons if "request" in r or r.startswith("pairs_")], reasons
    assert not Path(paths.work).exists(), "the checkpoint outlived the commit"
    # A third run changes nothing.
    again = expand_shard(source, output_root, recipe, settings)
    assert again.already_committed and again.accepted == result.accepted
    print(
        f"\nkill/restart: {len(checkpointed)}/{documents} documents checkpointed before the kill, "
        f"failed {failed_after:.1f}s after it, {result.resumed_documents} resumed; server startups "
        f"{first_startup:.0f}s and {second_startup:.0f}s; rejects {dict(reasons)}"
    )


# -- a whole shard against the session server ------------------------------------------


def test_shard_end_to_end_tokens_agree_with_metrics_and_prefix_cache_pays(
    vllm_server, vllm_api_key, tiny_model_dir, tmp_path, caplog
):
    documents = 50
    source = write_wiki_shard(tmp_path / "source" / "e2e.parquet", documents, first_article=3000)
    output_root = str(tmp_path / "expanded")
    recipe = load_recipe(TINY_RECIPE, tokenizer=str(tiny_model_dir))
    settings = RunSettings(
        endpoints=(vllm_server.url,), api_key=vllm_server.api_key, max_concurrency=32, progress_interval_s=5,
    )
    caplog.set_level(logging.DEBUG)

    before = read_metrics(vllm_server.url)
    started = time.monotonic()
    result = expand_shard(source, output_root, recipe, settings)
    seconds = time.monotonic() - started
    after = read_metrics(vllm_server.url)

    def delta(name: str) -> int:
        return int(after.get(name, 0.0) - before.get(name, 0.0))

    # Committed: data/ and rejected/ hold 5 rows per document, each (doc, pair) once.
    accepted, rejected = read_output(output_root, recipe.recipe_id, "e2e")
    assert result.documents == documents
    assert (result.accepted, result.rejected) == (len(accepted), len(rejected))
    assert_every_pair_exactly_once(accepted, rejected, documents, recipe.pairs_per_document)
    assert not Path(shard_paths(output_root, recipe.recipe_id, "e2e").work).exists()

    # Pairs: structured outputs turn random weights into valid JSON every time.
    reasons = Counter(row["reject_reason"] for row in rejected)
    assert not [r for r in reasons if r.startswith("pairs_")], reasons
    rows = accepted + rejected
    assert all(row["genre"] and row["audience"] for row in rows)
    # Rewrites ran for every pair. The tiny recipe's cleaning is wide open, so the only
    # rejects random text can earn are a rewrite cut at max_tokens or one that is empty
    # (EOS drawn first); anything else (a request failure, a 401) is a real fault.
    assert all(row["completion_tokens"] > 0 and row["finish_reason"] in ("stop", "length") for row in rows)
    assert set(reasons) <= {"truncated", "empty"}, reasons
    assert len(accepted) >= 0.5 * len(rows)

    # Usage tokens in the output == the server's counters over the run.
    prompt_tokens = sum(row["prompt_tokens"] + row["pairs_prompt_tokens"] for row in rows)
    completion_tokens = sum(row["completion_tokens"] + row["pairs_completion_tokens"] for row in rows)
    assert (prompt_tokens, completion_tokens) == (result.prompt_tokens, result.completion_tokens)
    assert prompt_tokens == delta("vllm:prompt_tokens_total")
    assert completion_tokens == delta("vllm:generation_tokens_total")
    # Every attempt the server answered is one it counted; an attempt that failed before it
    # (a pooled connection the server had closed) is retried and said by cause.
    answered = result.requests - sum(result.failed_attempts.values())
    assert answered == delta("vllm:request_success_total"), result.failed_attempts
    assert answered == documents * (1 + recipe.pairs_per_document), result.failed_attempts

    # The six requests of a document share instructions + document: the cache computes it once.
    hit_rate = prefix_cache_hit_rate(before, after)
    print(
        f"\nvLLM e2e: {documents} docs, {result.requests} requests (failed attempts {result.failed_attempts}) "
        f"in {seconds:.1f}s "
        f"({completion_tokens / seconds:.0f} generated tok/s); prompt tokens {prompt_tokens} "
        f"(metrics {delta('vllm:prompt_tokens_total')}), completion tokens {completion_tokens} "
        f"(metrics {delta('vllm:generation_tokens_total')}); prefix-cache hit rate {hit_rate:.3f} "
        f"({delta('vllm:prefix_cache_hits_total')}/{delta('vllm:prefix_cache_queries_total')} tokens); "
        f"accepted {len(accepted)}, rejected {dict(reasons)}"
    )
    assert hit_rate is not None and hit_rate > 0.5

    # The judge on the real engine: grammar-constrained JSON gives every sample a score
    # (random ones; the tiny recipe's threshold is 0), and its tokens are the server's.
    before_judge = read_metrics(vllm_server.url)
    report = judge_committed_shard(source, output_root, recipe, settings, sample=8, shard="e2e")
    after_judge = read_metrics(vllm_server.url)
    assert (report.sampled, report.scored) == (8, 8), report.failures
    judge_prompt_tokens = after_judge["vllm:prompt_tokens_total"] - before_judge["vllm:prompt_tokens_total"]
    assert report.prompt_tokens == int(judge_prompt_tokens)
    print(f"vLLM judge: scores {report.statistics()['scores']}, {report.completion_tokens} tokens generated")

    # The key reached the server (every request was authenticated) and no log line.
    assert vllm_api_key not in caplog.text
    assert all(vllm_api_key not in str(record.args) for record in caplog.records)
    assert vllm_api_key not in repr(settings)
    assert not any(vllm_api_key.encode() in f.read_bytes() for f in Path(output_root).rglob("*") if f.is_file())


@pytest.mark.parametrize(
    "mistake, cause",
    [({"api_key": "not-the-key"}, "refused the API key"), ({"served_model": "no-such-model"}, "does not serve model")],
    ids=["wrong-key", "wrong-model"],
)
def test_real_engine_refuses_a_wrong_key_or_model_before_any_document(
    vllm_server, tiny_model_dir, tmp_path, mistake, cause
):
    source = write_wiki_shard(tmp_path / "source" / "keyed.parquet", 3, first_article=3900)
    recipe = load_recipe(TINY_RECIPE, tokenizer=str(tiny_model_dir))
    wrong = RunSettings(**{"endpoints": (vllm_server.url,), "api_key": vllm_server.api_key, **mistake})
    before = read_metrics(vllm_server.url)
    with pytest.raises(EndpointsUnavailable, match=cause):
        expand_shard(source, str(tmp_path / "out"), recipe, wrong)
    after = read_metrics(vllm_server.url)
    assert after.get("vllm:prompt_tokens_total", 0) == before.get("vllm:prompt_tokens_total", 0)  # nothing was asked
    assert not Path(shard_paths(str(tmp_path / "out"), recipe.recipe_id, "keyed").data).exists()

    right = RunSettings(endpoints=(vllm_server.url,), api_key=vllm_server.api_key)
    result = expand_shard(source, str(tmp_path / "out"), recipe, right)
    assert result.documents == 3 and result.accepted + result.rejected == 3 * recipe.pairs_per_document
