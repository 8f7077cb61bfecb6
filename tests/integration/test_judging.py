"""The judge's measurement of a committed shard through the CLI, against the test LLM
server: the sample, the figures, the record in the registry (the figures on their own:
tests/unit/method/test_judging.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.shard import expand_shard
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import Registry
from maga_tasks.settings import RunSettings
from maga_tasks.tools.test_server.answers import genre_named
from tests.support.cli import maga

RECIPE = load_recipe()


@pytest.mark.integration
def test_judge_shard_cli_samples_the_same_rows_and_records_them(tmp_path, llm_server):
    source = str(write_sample_corpus(tmp_path / "source", 1, 8)[0])
    out = str(tmp_path / "out")
    expand_shard(source, out, RECIPE, RunSettings(endpoints=(llm_server.url,), max_concurrency=16))
    registry_path = str(tmp_path / "registry.sqlite")
    args = ("judge-shard", source, "--output-root", out, "--endpoint", llm_server.url, "--sample", "5")

    first = maga("-q", *args, "--registry", registry_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["sampled"] == summary["scored"] == 5 and summary["pass_share"] == 1.0
    samples = json.loads(Path(summary["judge_uri"]).read_text())["samples"]
    (judged,) = Registry(registry_path).quality_results(RECIPE.recipe_id, "part-0000")
    assert judged["suite"] == "judge" and judged["success"] and judged["docs_uri"] == summary["judge_uri"]
    # The genre question: each sample's answer is the server's rule on its row, and the
    # share of them is in the summary and the registry.
    texts = {row["id"]: row for row in pq.read_table(next(Path(out).rglob("data/*.parquet"))).to_pylist()}
    answers = [s["genre_kept"] for s in samples]
    assert answers == [genre_named(texts[s["id"]]["genre"], texts[s["id"]]["text"]) for s in samples]
    kept = answers.count(True)
    assert summary["genre_answers"] == {k: n for k, n in (("kept", kept), ("not_kept", 5 - kept)) if n}
    assert summary["genre_kept_share"] == judged["statistics"]["genre_kept_share"] == kept / 5

    second = maga("-q", *args)
    assert second.returncode == 0, second.stderr
    again = json.loads(Path(summary["judge_uri"]).read_text())["samples"]
    assert [s["id"] for s in again] == [s["id"] for s in samples]  # a deterministic sample
    assert [s["id"] for s in samples] == sorted(s["id"] for s in samples)


@pytest.mark.integration
def test_a_judge_answering_with_loose_types_counts_no_score_and_no_genre(tmp_path, llm_server_factory):
    """`"score": true` and `"genre_kept": "yes"` are valid JSON of the wrong types: each
    such answer is a judge failure with its reason, never a score of 1 or a kept genre."""
    server = llm_server_factory("loose_types")
    source = str(write_sample_corpus(tmp_path / "source", 1, 6)[0])
    out = str(tmp_path / "out")
    expand_shard(source, out, RECIPE, RunSettings(endpoints=(server.url,), max_concurrency=16))
    done = maga("-q", "judge-shard", source, "--output-root", out, "--endpoint", server.url, "--sample", "4")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["sampled"] == 4 and summary["scored"] == 0 and summary["pass_share"] is None
    assert summary["failures"] == {"judge_invalid_answer": 4}
    assert summary["genre_answers"] == {} and summary["genre_kept_share"] is None
