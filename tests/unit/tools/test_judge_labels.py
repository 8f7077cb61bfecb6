"""`maga bench --suite quality --judge-labels FILE` refuses a bad labels file, or a recipe
whose judge asks no genre question, in one line before any model runs (the operator's
file: a traceback 20 minutes into the expansion was the old behaviour)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from maga_tasks.recipe import builtin_recipe_path
from maga_tasks.tools.judge_labels import labelled_rewrites
from tests.support.paths import FIXTURES_DIR

GOOD_ROW = {"kind": "rewrite", "source": "Rivers carry water.", "genre": "a letter", "audience": "children",
            "output": "Dear Sam, rivers carry water.", "label": "good", "split": "tune"}
# Nothing listens here: a command that got as far as the model would fail another way.
NO_SERVER = "http://127.0.0.1:9"


def _bench(tmp_path, labels, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maga_tasks.cli", "bench", "--suite", "quality", "--endpoint", NO_SERVER,
         "--judge-labels", str(labels), "--out", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, timeout=120,
    )


def test_the_labelled_fixture_reads_as_labelled_rewrites():
    fixture = FIXTURES_DIR / "smollm2_outputs.jsonl"
    rows = labelled_rewrites(fixture)
    assert len(rows) == fixture.read_text().count('"kind": "rewrite"') > 300
    assert {row["split"] for row in rows} == {"tune", "held_out", "fresh"}


@pytest.mark.parametrize(
    "lines, said",
    [
        ([json.dumps(GOOD_ROW), "{not json"], "line 2: not JSON"),
        ([json.dumps(GOOD_ROW), "[1, 2]"], "line 2: not a JSON object"),
        ([json.dumps({**GOOD_ROW, "label": None, "output": 3})], "line 1: no text for output, label"),
        ([json.dumps({"kind": "pairs"})], "no labelled rewrite"),
    ],
)
def test_a_malformed_labels_file_is_refused_in_one_line_before_the_model_runs(tmp_path, lines, said):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(lines) + "\n")
    done = _bench(tmp_path, labels)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"maga: error: labels file {labels}") and said in last, last
    assert not (tmp_path / "out").exists()


def test_a_missing_labels_file_is_refused_in_one_line(tmp_path):
    done = _bench(tmp_path, tmp_path / "absent.jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"maga: error: labels file {tmp_path / 'absent.jsonl'}: cannot be read (FileNotFoundError)"
    )


def test_a_recipe_that_asks_no_genre_question_is_refused_before_the_model_runs(tmp_path):
    data = yaml.safe_load(builtin_recipe_path("default").read_text())
    data["prompts"]["judge"] = data["prompts"]["judge"].replace("Genre: {genre}\n", "")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps(GOOD_ROW) + "\n")
    done = _bench(tmp_path, labels, "--recipe", str(recipe))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith("its judge task does not name {genre}, so it asks no genre question"), last
