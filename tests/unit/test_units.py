"""Small pieces: pair validation, seeds, shard names, checkpoint reading, settings."""

from __future__ import annotations

import json

import pytest

from maga_tasks.data.checkpoint import Checkpoint
from maga_tasks.data.layout import LayoutError, check_shard_name, shard_name
from maga_tasks.method.stages import derive_seed, parse_json_object, validate_pairs
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings

RECIPE = load_recipe()


def pairs(n: int, genre: str = "A step-by-step tutorial in plain words", audience: str = "Adult beginners") -> dict:
    return {"pairs": [{"genre": f"{genre} {i}", "audience": f"{audience} {i}"} for i in range(n)]}


def test_validate_pairs_accepts_exactly_n_distinct():
    got, reason, _ = validate_pairs(pairs(5), RECIPE)
    assert len(got) == 5 and reason == ""


@pytest.mark.parametrize(
    "answer, reason",
    [
        (None, "pairs_invalid_json"),
        ({"pair": []}, "pairs_invalid_json"),
        (pairs(4), "pairs_wrong_count"),
        (
            {"pairs": [{"genre": "A step-by-step tutorial in plain words", "audience": "Adult beginners"}] * 5},
            "pairs_duplicate",
        ),
        ({"pairs": [{"genre": "", "audience": "x"}] * 5}, "pairs_empty_field"),
        (pairs(5, genre="short"), "pairs_length"),
    ],
)
def test_validate_pairs_rejections(answer, reason):
    assert validate_pairs(answer, RECIPE)[1] == reason


def test_parse_json_object_tolerates_fences_and_chatter():
    assert parse_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_object('Here you go: {"a": [1, 2]} done') == {"a": [1, 2]}
    assert parse_json_object("no json") is None


def test_seeds_are_deterministic_and_distinct():
    assert derive_seed("s:1", "pairs", -1, 0) == derive_seed("s:1", "pairs", -1, 0)
    assert derive_seed("s:1", "pairs", -1, 0) != derive_seed("s:1", "pairs", -1, 1)
    assert 0 <= derive_seed("x", "rewrite", 3, 0) < 2**31


@pytest.mark.parametrize(
    "uri, name",
    [
        ("/data/part-0001.parquet", "part-0001"),
        ("s3://b/drops/2026-11-01/part-0001.jsonl.gz", "part-0001"),
        ("/x/../../etc/passwd.jsonl", "passwd"),
        ("/x/we ird;name..parquet", "we_ird_name"),
    ],
)
def test_shard_names_are_sanitized(uri, name):
    assert shard_name(uri) == name


def test_unsafe_names_are_refused():
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(LayoutError):
            check_shard_name(bad)


def test_checkpoint_index_skips_torn_line_and_keeps_first_copy(tmp_path):
    segment = tmp_path / "part-a.jsonl"
    lines = [
        json.dumps({"i": 0, "rows": [{"v": "first"}]}),
        json.dumps({"i": 1, "rows": []}),
        json.dumps({"i": 0, "rows": [{"v": "again"}]}),
    ]
    segment.write_text("\n".join(lines) + "\n" + '{"i": 2, "rows": [')
    index = Checkpoint.index([segment])
    assert sorted(index) == [0, 1]
    assert Checkpoint.read(index[0]) == [{"v": "first"}]


def test_settings_validate_endpoints_and_hide_the_key():
    settings = RunSettings(endpoints=("http://a:8000/v1/", "http://a:8000"), api_key="secret-key")
    assert settings.endpoints == ("http://a:8000",)
    assert "secret-key" not in repr(settings)
    with pytest.raises(ValueError, match="http"):
        RunSettings(endpoints=("a:8000",))
