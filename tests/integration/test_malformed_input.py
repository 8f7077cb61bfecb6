"""Malformed shards: a clear one-line error or row-level rejections, never a partial commit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maga_tasks.engine.shard import expand_shard
from maga_tasks.errors import ShardInputError
from maga_tasks.recipe import load_recipe
from maga_tasks.settings import RunSettings

pytestmark = pytest.mark.integration

RECIPE = load_recipe()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maga_tasks.cli", *args], capture_output=True, text=True, timeout=300)


def assert_nothing_committed(out: Path) -> None:
    committed = list(out.rglob("data/*.parquet")) + list(out.rglob("rejected/*.parquet"))
    assert committed == []


def test_missing_text_column_is_a_one_line_error(tmp_path, llm_server):
    shard = tmp_path / "no-text.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["x", "y"]}), shard)
    done = run_cli("expand-shard", str(shard), "--output-root", str(tmp_path / "out"), "--endpoint", llm_server.url)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("maga: error:")
    assert "missing column" in done.stderr and "'text'" in done.stderr
    assert "Traceback" not in done.stderr
    assert_nothing_committed(tmp_path / "out")
    assert llm_server.stats()["requests_total"] == 0


def test_corrupt_parquet_is_a_one_line_error(tmp_path, llm_server):
    shard = tmp_path / "corrupt.parquet"
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(50)], "text": ["some words here"] * 50}), good)
    raw = good.read_bytes()
    shard.write_bytes(raw[:4] + b"\x00" * (len(raw) // 2) + raw[4 + len(raw) // 2 :])
    done = run_cli("expand-shard", str(shard), "--output-root", str(tmp_path / "out"), "--endpoint", llm_server.url)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "maga: error:" in done.stderr
    assert_nothing_committed(tmp_path / "out")


def test_truncated_file_and_missing_file(tmp_path, llm_server):
    shard = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["t"]}), tmp_path / "whole.parquet")
    shard.write_bytes((tmp_path / "whole.parquet").read_bytes()[:-20])
    for source in (shard, tmp_path / "absent.parquet", tmp_path / "notes.txt"):
        done = run_cli(
            "expand-shard", str(source), "--output-root", str(tmp_path / "out"), "--endpoint", llm_server.url
        )
        assert done.returncode == 2, (source, done.stderr)
        assert "Traceback" not in done.stderr and "maga: error:" in done.stderr
    assert_nothing_committed(tmp_path / "out")


def test_bad_rows_are_rejected_with_reasons(tmp_path, llm_server, sample_articles, tiny_tokenizer_dir):
    good = [a["text"] for a in sample_articles[:3]]
    # Long enough to be cut to the context budget, within max_source_chars (a longer one is
    # a rejected row: tests/integration/hostile/test_source_files.py).
    huge = (" ".join(a["text"] for a in sample_articles[:200]) + " ") * 12
    assert 1_000_000 < len(huge) <= RECIPE.quality.max_source_chars
    texts = pa.array(
        [
            good[0].encode(), None, b"   ", b"caf\xe9 \xff invalid bytes",
            good[1].encode(), good[2].encode(), huge.encode(),
        ],
        type=pa.binary(),
    )
    ids = pa.array(["ok-1", "null-text", "blank", "latin1", "ok-1", None, "huge"])
    shard = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts, "lang": ["en"] * 7}), shard)
    recipe = load_recipe(tokenizer=str(tiny_tokenizer_dir), context_budget_tokens=1024)

    result = expand_shard(str(shard), str(tmp_path / "out"), recipe, RunSettings(endpoints=(llm_server.url,)))

    rejected = pq.read_table(result.rejected_uri).to_pylist()
    reasons = {(r["source_id"], r["reject_reason"]) for r in rejected}
    assert ("null-text", "missing_text") in reasons
    assert ("blank", "empty_text") in reasons
    assert ("latin1", "invalid_utf8") in reasons
    assert ("ok-1", "duplicate_id") in reasons
    assert ("#row5", "missing_id") in reasons
    # The repeated "ok-1" is a rejected source row, not a document; its rows keep ids of their own.
    assert result.documents == 6
    assert result.accepted + result.rejected == 7 * recipe.pairs_per_document
    assert result.rejects_by_reason["duplicate_id"] == recipe.pairs_per_document
    data = pq.read_table(result.data_uri).to_pylist()
    huge_rows = [r for r in data + rejected if r["source_id"] == "huge"]
    assert len(huge_rows) == recipe.pairs_per_document
    assert all(r["source_truncated_tokens"] and r["source_truncated_tokens"] <= 1024 for r in huge_rows)
    assert {r["source_id"] for r in data} >= {"ok-1", "huge"}
    assert json.loads(data[0]["source_meta"]) == {"lang": "en"}
    ids = [r["id"] for r in data + rejected]
    assert len(ids) == len(set(ids))


def test_a_repeated_id_keeps_its_first_row_even_when_that_row_is_bad(tmp_path, llm_server, sample_articles):
    texts = pa.array(
        [b"caf\xe9 \xff", sample_articles[0]["text"].encode(), sample_articles[1]["text"].encode()], pa.binary()
    )
    shard = tmp_path / "first-bad.parquet"
    pq.write_table(pa.table({"id": ["a", "a", "b"], "text": texts}), shard)

    result = expand_shard(str(shard), str(tmp_path / "out"), RECIPE, RunSettings(endpoints=(llm_server.url,)))

    rows = pq.read_table(result.rejected_uri).to_pylist() + pq.read_table(result.data_uri).to_pylist()
    by_reason = {(r["source_id"], r.get("reject_reason")) for r in rows}
    assert ("a", "invalid_utf8") in by_reason and ("a", "duplicate_id") in by_reason
    # The later "a" is never expanded.
    assert not any(r["source_id"] == "a" and not r.get("reject_reason") for r in rows)
    assert result.documents == 2 and len(rows) == 3 * RECIPE.pairs_per_document
    assert len({r["id"] for r in rows}) == len(rows)


def test_jsonl_and_gzip_with_broken_lines(tmp_path, llm_server, sample_articles):
    import gzip

    lines = [json.dumps({"id": "a", "text": sample_articles[0]["text"]}), "{not json", json.dumps([1, 2]),
             json.dumps({"id": "b", "text": sample_articles[1]["text"], "url": "http://x"})]
    plain = tmp_path / "s.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    zipped = tmp_path / "z.jsonl.gz"
    with gzip.open(zipped, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    for shard in (plain, zipped):
        result = expand_shard(str(shard), str(tmp_path / "out"), RECIPE, RunSettings(endpoints=(llm_server.url,)))
        assert result.documents == 4
        rejected = pq.read_table(result.rejected_uri)
        assert rejected["reject_reason"].to_pylist().count("invalid_json_line") == 2 * RECIPE.pairs_per_document
        assert result.accepted == 2 * RECIPE.pairs_per_document


def test_shard_names_cannot_escape_the_output_root(tmp_path, llm_server, sample_articles):
    nasty = tmp_path / "..%2F..%2Fetc passwd;rm -rf.jsonl"
    nasty.write_text(json.dumps({"id": "a", "text": sample_articles[0]["text"]}) + "\n")
    result = expand_shard(str(nasty), str(tmp_path / "out"), RECIPE, RunSettings(endpoints=(llm_server.url,)))
    assert Path(result.data_uri).resolve().is_relative_to((tmp_path / "out").resolve())
    assert "/" not in result.shard and ".." not in result.shard


def test_unusable_shard_raises_shard_input_error(tmp_path, llm_server):
    shard = tmp_path / "ids-only.parquet"
    pq.write_table(pa.table({"id": ["a"]}), shard)
    with pytest.raises(ShardInputError, match="missing column"):
        expand_shard(str(shard), str(tmp_path / "out"), RECIPE, RunSettings(endpoints=(llm_server.url,)))


def test_unreachable_endpoints_exit_3_with_one_line(tmp_path, sample_articles):
    from tests.support.servers import free_port

    shard = tmp_path / "s.jsonl"
    shard.write_text(json.dumps({"id": "a", "text": sample_articles[0]["text"]}) + "\n")
    dead = f"http://127.0.0.1:{free_port()}"
    done = run_cli("expand-shard", str(shard), "--output-root", str(tmp_path / "out"), "--endpoint", dead,
                   "--all-down-timeout", "1")
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1].startswith("maga: error:") and "Traceback" not in done.stderr
    assert_nothing_committed(tmp_path / "out")
