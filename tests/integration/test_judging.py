"""The judge's measurement of a committed shard through the CLI, against the test LLM
server: the sample, the figures, the record in the registry (the figures on their own:
tests/unit/method/test_judging.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.shard import expand_shard
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import Registry
from maga_tasks.settings import RunSettings
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

    second = maga("-q", *args)
    assert second.returncode == 0, second.stderr
    again = json.loads(Path(summary["judge_uri"]).read_text())["samples"]
    assert [s["id"] for s in again] == [s["id"] for s in samples]  # a deterministic sample
    assert [s["id"] for s in samples] == sorted(s["id"] for s in samples)
