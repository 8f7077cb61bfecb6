"""The judge's measurement of a committed shard: its figures, and the CLI refusing an
uncommitted shard (the CLI judging a shard against the test LLM server:
tests/integration/test_judging.py)."""

from __future__ import annotations

from maga_tasks.data.sample_corpus import write_sample_corpus
from maga_tasks.method.judging import JudgeReport
from tests.support.cli import maga


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


def test_the_genre_kept_share_counts_the_genre_questions_answers_only():
    report = JudgeReport("s", "r", sampled=5, scores={4: 5}, genre_answers={"kept": 3, "not_kept": 1})
    statistics = report.statistics()
    assert statistics["genre_kept_share"] == 0.75 and statistics["genre_answers"] == {"kept": 3, "not_kept": 1}
    assert report.success  # a flag beside the pass share, never part of the verdict
    assert JudgeReport("s", "r", sampled=5, scores={4: 5}).statistics()["genre_kept_share"] is None


def test_judge_shard_of_an_uncommitted_shard_is_a_one_line_error(tmp_path):
    source = str(write_sample_corpus(tmp_path / "source", 1, 2)[0])
    result = maga("-q", "judge-shard", source, "--output-root", str(tmp_path / "out"), "--endpoint", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not committed" in result.stderr, result.stderr
