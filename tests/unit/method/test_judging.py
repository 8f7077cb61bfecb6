"""The judge's measurement of a committed shard: the sample, the figures, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.engine.shard import expand_shard
from maga_tasks.method.judging import JudgeReport
from maga_tasks.recipe import load_recipe
from maga_tasks.registry import Registry
from maga_tasks.settings import RunSettings

RECIPE = load_recipe()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "-q", *args], capture_output=True, text=True, timeout=300
    )


def test_pass_share_counts_scores_of_three_and_more():
    report = JudgeReport(
        "s", "r", sampled=6, scores={5: 2, 3: 1, 2: 1}, failures={"judge_invalid_answer": 2}, min_pass_share=0.7
    )
    assert report.scored == 4 and report.pass_share == 0.75 and report.success
    statistics = report.statistics()
    assert statistics["scores"] == {"1": 0, "2": 1, "3": 1, "4": 0, "5": 2}
    assert statistics["mean_score"] == 3.75 and statistics["failures"] == {"judge_invalid_answer": 2}
    nothing = JudgeReport("s", "r", sampled=3, failures={"judge_request_http_500": 3})
    assert nothing.pass_share is None and not nothing.success and nothing.statistics()["mean_score"] is None


@pytest.mark.integration
def test_judge_shard_cli_samples_the_same_rows_and_records_them(tmp_path, llm_server):
    source = str(write_sample_corpus(tmp_path / "source", 1, 8)[0])
    out = str(tmp_path / "out")
    expand_shard(source, out, RECIPE, RunSettings(endpoints=(llm_server.url,), max_concurrency=16))
    registry_path = str(tmp_path / "registry.sqlite")
    args = ("judge-shard", source, "--output-root", out, "--endpoint", llm_server.url, "--sample", "5")

    first = run_cli(*args, "--registry", registry_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["sampled"] == summary["scored"] == 5 and summary["pass_share"] == 1.0
    samples = json.loads(Path(summary["judge_uri"]).read_text())["samples"]
    (judged,) = Registry(registry_path).quality_results(RECIPE.recipe_id, "part-0000")
    assert judged["suite"] == "judge" and judged["success"] and judged["docs_uri"] == summary["judge_uri"]

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    again = json.loads(Path(summary["judge_uri"]).read_text())["samples"]
    assert [s["id"] for s in again] == [s["id"] for s in samples]  # a deterministic sample
    assert [s["id"] for s in samples] == sorted(s["id"] for s in samples)


def test_judge_shard_of_an_uncommitted_shard_is_a_one_line_error(tmp_path):
    source = str(write_sample_corpus(tmp_path / "source", 1, 2)[0])
    result = run_cli("judge-shard", source, "--output-root", str(tmp_path / "out"), "--endpoint", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not committed" in result.stderr, result.stderr
